"""The Ray executor of `cxr screen --ray` (optional extra: ``pip install 'cxr-engine[ray]'``).

Never imported without --ray: engine.runner.screen imports `executor` only when a config asks
for Ray, and `executor` (the driver) imports Ray only inside its functions. `worker` (the
actor that screens shards, and the model files shipped to it) and `shard` (screen one shard
into its part; what a worker must see) import no Ray, so they are tested without it.
"""
