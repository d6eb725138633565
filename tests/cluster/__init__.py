"""Tests against a three-node RabbitMQ cluster of their own (tests.support.rabbit_cluster)."""
