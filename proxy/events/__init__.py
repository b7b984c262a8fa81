"""Events in: verified platform callbacks and long-connection relays, handed to the application over local HTTP.

Owns crypto, callback endpoints, delivery and the stream clients; it does not own token injection or API proxying.
"""
