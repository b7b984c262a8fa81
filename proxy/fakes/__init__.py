"""Simulated Feishu and DingTalk platforms, for the tests and for `imsidecar demo`.

They follow the real platforms' rules (token expiry, errors inside HTTP 200 bodies, rate-limit headers, dropped
connections); they are not part of the forwarding path.
"""
