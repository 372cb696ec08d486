"""FlashRT's runtime: the ZeroMQ policy server around the engine, its wire protocol and its client.

`runtime.client`, `runtime.protocol` and `runtime.observation` need only pyzmq, msgpack and numpy;
the server side (`runtime.server`, `runtime.config`, ...) also imports flashrt. Nothing is imported
here, so a robot computer can `from runtime.client import PolicyClient` without torch.
"""
