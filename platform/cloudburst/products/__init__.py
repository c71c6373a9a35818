"""Stores made by applying a trained model to an ingested store, frame by frame.

- :mod:`cloudburst.products.derived`: the shared writer: a Zarr v3 group created for one
  request (fingerprint), written in time blocks, marked complete last, removed again when the
  run fails before its marker;
- :mod:`cloudburst.products.codes`: a discrete coder's codes (and its codebook) of a field,
  the compression ratio, and the field decoded back;
- :mod:`cloudburst.products.translate`: a translator's output variable (e.g. visible imagery
  from infrared bands) on the input store's grid, in the target's physical units.
"""
