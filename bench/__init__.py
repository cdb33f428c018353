"""Benchmarks of m365sync's performance targets (docs/design.md "Performance targets").

Each module runs as ``.venv/bin/python -m bench.<name>`` against the real RabbitMQ and
MongoDB-wire database, in a private vhost and database it removes at the end. They print
ratios measured side by side in one run; nothing here is part of the test suite.
"""
