"""Spending less of the platform's quota: coalesced and cached reads, latest-wins card updates, priority lanes and
the monthly quota meter. One module per stage; settings.py holds their config sections.
"""
