"""The data layer, one job per module (imports run down this list, never back):

- `plan`: a clip's plan (frame indices, mask, augmentation draw, test view), made by one
  function for every backend, evaluation and multi-view testing.
- `decode`: frames of one clip from its video, frame folder or cached file; `to_clip`.
- `base`: the `Batch` contract, the clip order and the loader position (`ClipLoader`),
  and `SyntheticLoader` (batches with no decoding, to time the model alone).
- `torch_loader`: the CPU fallback (PyAV / PIL + torchvision in DataLoader workers).
- `select`: which backend and which source can run here; `build_loader`, the one place
  that knows every backend (the DALI one, meld_dali.pipelines, imported lazily).

Nothing is re-exported here, so importing one module never drags in the others.
"""
