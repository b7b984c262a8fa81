"""Group robots and the alert bridge: signed, rate-limited messages to DingTalk and Feishu custom bots.

Entry points: `settings.parse_robots` for the `robots:` section, `handlers.RobotService`, `add_robot_routes`, `dispatch`.
"""
