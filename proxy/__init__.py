"""imsidecar: a local proxy between applications and the Feishu/Lark and DingTalk open APIs.

The package is imported as `proxy`; the product, console script and metric prefix are `imsidecar`.
"""

__version__ = "0.1.0"
