"""The Ray executor of `cxr screen --ray` (optional extra: ``pip install 'cxr-engine[ray]'``).

Never imported without --ray: engine.runner.screen imports `executor` only when a config asks
for Ray. `shard` (screen one shard into its part) and `view` (what a worker must see) import no
Ray, so they are tested without it.
"""
