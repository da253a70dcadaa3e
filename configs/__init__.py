"""Training configs for ``adafactor-train``, installed as ``adafactor_jax.training.configs``.

Each module has ``get_config()`` returning an ``ml_collections.ConfigDict``
built from :mod:`adafactor_jax.training.configs.default`. Pass one with
``adafactor-train --config configs/<name>.py`` and override any field with
``--config.<field>=<value>``.
"""
