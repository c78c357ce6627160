"""Host tools that never run on a device: keys, the bundle writer, model packing, board config, sims.

May use the device shell and the controller (the fleet simulator drives both); nothing
below imports this package.
"""
