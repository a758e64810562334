"""How far to trust a trained layer:

    metrics.py     accuracy, sensitivity, specificity, ROC AUC, calibration, each with its interval
    ood.py         the distance that says "unlike the training images" (photos)
    population.py  the distance that says "unlike the training X-rays" (another population, machine or view)
    cam.py         class activation maps: what drove a prediction
    report.py      all of it as an HTML page with plots
"""
