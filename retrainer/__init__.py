"""retrainer: retrain an image classifier on your own folder of photos."""
__version__ = "0.1.0"
