"""@subscriber declarations: validated at the call, names unique, registry resettable."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from django_pubsub import Message, registry, subscriber
from django_pubsub.exceptions import AlreadyRegistered, InvalidSubscriber, InvalidTopic


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = registry.get_specs()
    registry.reset()
    yield
    registry.reset()
    for spec in saved.values():
        registry.register(spec)


def handler(message: Message) -> None:
    pass


def other_handler(message: Message) -> None:
    pass


def test_declaration_records_the_dotted_path(clean_registry: None) -> None:
    decorated = subscriber("orders", name="billing.charge", ordered=True, max_attempts=7)(handler)
    assert decorated is handler
    spec = registry.get_specs()["billing.charge"]
    assert spec.handler == "tests.test_registry.handler"
    assert (spec.topic, spec.ordered, spec.max_attempts, spec.lease) == ("orders", True, 7, None)


def test_same_declaration_twice_is_fine_but_a_clash_is_an_error(clean_registry: None) -> None:
    subscriber("orders", name="billing.charge")(handler)
    subscriber("orders", name="billing.charge")(handler)  # a module imported twice
    with pytest.raises(AlreadyRegistered, match="declared twice"):
        subscriber("orders", name="billing.charge")(other_handler)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": ""}, InvalidSubscriber),
        ({"name": "has space"}, InvalidSubscriber),
        ({"name": "ok", "max_attempts": 0}, InvalidSubscriber),
        ({"name": "ok", "max_attempts": True}, InvalidSubscriber),
        ({"name": "ok", "lease": -1}, InvalidSubscriber),
        ({"name": "ok", "timeout": 0}, InvalidSubscriber),
        ({"name": "ok", "timeout": "1s"}, InvalidSubscriber),
        ({"name": "ok", "max_inflight": 1.5}, InvalidSubscriber),
        ({"name": "ok", "ordered": "yes"}, InvalidSubscriber),
        ({"name": "ok", "start": "beginning"}, InvalidSubscriber),
        ({"name": "ok", "backoff": {"base": 1, "speed": 2}}, InvalidSubscriber),
        ({"name": "ok", "backoff": {"factor": 0.5}}, InvalidSubscriber),
        # Every option is bounded: finite, within a timedelta from now, within its column.
        ({"name": "ok", "lease": float("inf")}, InvalidSubscriber),
        ({"name": "ok", "lease": 1e12}, InvalidSubscriber),
        ({"name": "ok", "timeout": float("nan")}, InvalidSubscriber),
        ({"name": "ok", "max_attempts": 2**31}, InvalidSubscriber),
        ({"name": "ok", "max_inflight": 2**31}, InvalidSubscriber),
        ({"name": "ok", "backoff": {"maximum": float("inf")}}, InvalidSubscriber),
        ({"name": "ok", "backoff": {"base": float("nan")}}, InvalidSubscriber),
        # Keys, batches and delivery modes.
        ({"name": "ok", "ordered": "keys"}, InvalidSubscriber),
        ({"name": "ok", "ordered": 1}, InvalidSubscriber),
        ({"name": "ok", "on_dead": "dead_letter_key"}, InvalidSubscriber),
        ({"name": "ok", "ordered": True, "on_dead": "dead_letter_key"}, InvalidSubscriber),
        ({"name": "ok", "ordered": "key", "on_dead": "bury"}, InvalidSubscriber),
        ({"name": "ok", "delivery": "exactly_once"}, InvalidSubscriber),
        ({"name": "ok", "delivery": "at_most_once", "max_attempts": 3}, InvalidSubscriber),
        ({"name": "ok", "batch_size": 0}, InvalidSubscriber),
        ({"name": "ok", "batch_size": 10_001}, InvalidSubscriber),
        ({"name": "ok", "batch_size": True}, InvalidSubscriber),
        ({"name": "ok", "batch_wait": 1}, InvalidSubscriber),
        ({"name": "ok", "batch_size": 10, "batch_wait": -1}, InvalidSubscriber),
        ({"name": "ok", "batch_size": 10, "batch_wait": False}, InvalidSubscriber),
        ({"name": "ok", "batch_size": 10, "batch_wait": 3601}, InvalidSubscriber),
    ],
)
def test_bad_declarations_fail_at_the_decorator(
    clean_registry: None, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        subscriber("orders", **kwargs)(handler)
    assert registry.get_specs() == {}


def test_bad_topic_fails_at_the_decorator(clean_registry: None) -> None:
    with pytest.raises(InvalidTopic):
        subscriber("no spaces allowed", name="x")
    with pytest.raises(TypeError):
        subscriber("orders")(handler)  # type: ignore[call-arg]  # name is required


def test_keys_batches_and_delivery_modes_are_recorded(clean_registry: None) -> None:
    subscriber(
        "orders",
        name="keyed",
        ordered="key",
        on_dead="dead_letter_key",
        delivery="transactional",
        batch_size=50,
        batch_wait=0,
    )(handler)
    spec = registry.get_specs()["keyed"]
    assert (spec.ordered, spec.on_dead, spec.delivery) == (
        "key",
        "dead_letter_key",
        "transactional",
    )
    assert (spec.batch_size, spec.batch_wait) == (50, 0.0)


def test_async_handlers_are_accepted_but_not_in_a_transaction(clean_registry: None) -> None:
    subscriber("orders", name="async", timeout=5)(async_handler)
    assert registry.get_specs()["async"].handler == "tests.test_registry.async_handler"
    with pytest.raises(InvalidSubscriber, match="needs a def handler"):
        subscriber("orders", name="async.tx", delivery="transactional")(async_handler)


def test_nested_functions_cannot_be_subscribers(clean_registry: None) -> None:
    def local(message: Message) -> None:
        pass

    with pytest.raises(InvalidSubscriber, match="module-level function"):
        subscriber("orders", name="local")(local)


class CallableObject:
    def __call__(self, message: Message) -> None:
        pass


async def async_handler(message: Message) -> None:
    pass


async def async_generator(message: Message) -> Any:
    yield message


def takes_nothing() -> None:
    pass


def takes_two(message: Message, extra: int) -> None:
    pass


def takes_keyword_only(*, message: Message) -> None:
    pass


def takes_more_than_needed(message: Message, extra: int = 0, *rest: Any, **options: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("func", "said"),
    [
        (async_generator, "generator"),
        (takes_nothing, "called with one argument"),
        (takes_two, "called with one argument"),
        (takes_keyword_only, "called with one argument"),
        (staticmethod(handler), "module-level function"),
        (classmethod(handler), "module-level function"),
        (functools.partial(takes_two, extra=1), "module-level function"),
        (CallableObject(), "module-level function"),
    ],
)
def test_handlers_that_could_not_run_are_refused_at_declaration(
    clean_registry: None, func: Any, said: str
) -> None:
    """What could not run as written is refused at once (an async generator's body would
    never run)."""
    with pytest.raises(InvalidSubscriber, match=said):
        subscriber("orders", name="refused")(func)
    assert registry.get_specs() == {}


def test_a_method_cannot_be_a_subscriber_either_way_round(clean_registry: None) -> None:
    with pytest.raises(InvalidSubscriber, match="module-level function"):

        class Inside:
            @subscriber("orders", name="static")
            @staticmethod
            def handle(message: Message) -> None:
                pass

    with pytest.raises(InvalidSubscriber, match="module-level function"):

        class Outside:
            @staticmethod
            @subscriber("orders", name="static")
            def handle(message: Message) -> None:
                pass

    subscriber("orders", name="more")(takes_more_than_needed)
    assert list(registry.get_specs()) == ["more"]


def test_autodiscovery_found_the_apps_subscribers() -> None:
    specs = registry.get_specs()
    assert specs["billing.charge"].handler == "testproject.orders.subscribers.charge"
    assert specs["kill.ordered"].ordered is True
