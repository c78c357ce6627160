"""The fleet controller: a hawkBit-DDI-compatible update server for edgeops devices.

Modules, in the direction imports point (each imports only those below it):
    app         assembles the aiohttp application (build_app); serve runs it in a thread
    ddi_routes  hawkBit DDI v1 for devices, served from this controller's fleet
    regional    the same DDI paths served from a mirror of a parent controller
    api_routes  /api/v1 for operators
    tasks       background work: long-poll wake-ups, last-seen batches, gate ticks
    http        what every route shares: Settings, app keys, middleware, request helpers
    metrics     Prometheus figures read from the database
    fleet       fleet operations on the database: devices, bundles, actions, rollouts
    bundles     bundle intake: hash, verify as a device would, store by SHA-256
    actions     pure: what a DDI feedback report does to an action
    rollout     pure: wave planning and health gating (no clock, no I/O)
    db          SQLite (default, WAL) or PostgreSQL: schema and portable SQL
    errors      typed errors, each mapped to one HTTP status by http.errors_mw

Nothing on the device side imports this package (see docs/fleet-controller.md).
"""
