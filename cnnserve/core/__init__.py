"""The ground floor: what every other part of cnnserve stands on and nothing of the project beneath it.

spec.py (what a model takes and gives), onnxmeta.py (the metadata contract of an exported file),
preprocess.py (image bytes to the model's uint8 array), config.py (every setting, one default each),
store.py (BentoML's command and model store). No torch: the serving container carries this package.
"""
