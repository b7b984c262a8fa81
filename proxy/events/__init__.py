"""Events in: verified platform callbacks and long-connection relays, stored, then handed to the application over
local HTTP.

Owns crypto, callback endpoints, the durable event store (journal, Redis Stream, memory), delivery, leases among
replicas, card callbacks answered inline and the stream clients; it does not own token injection or API proxying.
"""
