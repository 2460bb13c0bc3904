"""The figures as Prometheus metrics (needs prometheus-client, an optional dependency)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from .stats import Figures


def registry_for(figures: Figures) -> CollectorRegistry:
    """A registry holding one snapshot of the figures (built per scrape)."""
    registry = CollectorRegistry()
    published = Gauge("pubsub_topic_published", "Messages published", ["topic"], registry=registry)
    scheduled = Gauge(
        "pubsub_topic_scheduled",
        "Messages published for later whose time has not come",
        ["topic"],
        registry=registry,
    )
    deliveries = Gauge(
        "pubsub_deliveries",
        "Deliveries by state",
        ["subscription", "topic", "state"],
        registry=registry,
    )
    failed = Gauge(
        "pubsub_deliveries_failed",
        "Deliveries that failed at least once",
        ["subscription", "topic"],
        registry=registry,
    )
    lag = Gauge(
        "pubsub_subscription_lag",
        "Messages of the topic the subscription has not finished",
        ["subscription", "topic"],
        registry=registry,
    )
    oldest = Gauge(
        "pubsub_subscription_oldest_unhandled_seconds",
        "Age of the oldest message the subscription has not finished",
        ["subscription", "topic"],
        registry=registry,
    )
    alive = Gauge("pubsub_dispatchers_alive", "Dispatchers alive", registry=registry)
    for topic in figures.topics:
        published.labels(topic.name).set(topic.published)
        scheduled.labels(topic.name).set(topic.scheduled)
    for sub in figures.subscriptions:
        for state, count in sub.states.items():
            deliveries.labels(sub.name, sub.topic, state).set(count)
        failed.labels(sub.name, sub.topic).set(sub.failed)
        lag.labels(sub.name, sub.topic).set(sub.lag)
        oldest.labels(sub.name, sub.topic).set(sub.oldest_age or 0)
    alive.set(len(figures.dispatchers))
    return registry
