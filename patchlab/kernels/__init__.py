"""Code that runs inside nnsight traces: torch-only and self-contained.

Everything in this package may execute on a remote server (NDIF), which has
torch and nnsight but not patchlab. So these modules import nothing but the
standard library, torch and each other, take plain data (tensors, ints, strings,
tuples, lists, dicts) and nnsight envoys, and never touch labels, xarray, files
or progress bars. `patchlab.remote` registers this package with
``nnsight.register`` so that its functions travel by value (as source) with a
request. The rest of patchlab plans on the client and calls a kernel *program*
(one function per algorithm step) inside one ``model.session``: locally or, with
``remote=``, as one request.

Conventions shared by every kernel:

- ``arch``: a dict describing the model (module paths relative to a decoder block,
  head layout, sizes), built by `patchlab.adapters.Adapter.arch`.
- sites are strings (`patchlab.components.Site` values); a hook point is a tuple
  ``(layer, path, io, rank)``.
- activation caches are dicts ``{(run, site, layer): tensor}`` in canonical shape,
  ``[prompt, pos, d_model]`` or ``[prompt, pos, head, d_head]``.
"""
