"""Who may call: SMART Backend Services tokens, users and roles, patients, purpose of use, TLS.

``caller`` (the outcome: :class:`Caller`), ``scopes`` and ``purposes`` (pure rules),
``registry`` (registered clients), ``tokens`` (issue and verify), ``policy`` (the route table,
deny by default, and per-entry checks), ``guard`` (the FastAPI dependency and the refusal
counter), ``tls`` (contexts and MLLP peer identification), ``peer`` (gateway-to-gateway
tokens), ``dev`` (dev tokens for the embedded profile). Errors derive from
:class:`gateway.auth.errors.AuthError`.
"""
