"""The Ray executor of `cxr screen --ray` (optional extra: ``pip install 'cxr-engine[ray]'``).

Never imported without --ray: engine.runner.screen imports `executor` only when a config asks
for Ray, and `executor` imports Ray only inside its functions. `shard` (screen one shard into
its part; what a worker must see) imports no Ray, so it is tested without it.
"""
