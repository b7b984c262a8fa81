"""In-process fakes of the platforms and of applications, for tests: they behave like the real thing, in memory.

Owns nothing production code imports; it does not mock our own modules.
"""
