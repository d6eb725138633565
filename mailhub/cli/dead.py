"""``mailhub dead list|show|replay|drop``: the collector's dead letters.

The collector keeps a message it can never handle (bad JSON, unknown user, no
addresses) as a *dead letter* with its reason (:mod:`mailhub.pubsub.deadletters`):
in the RabbitMQ queue ``[collector] dead_letter`` when ``[amqp] url`` is set,
else in ``{data}/collector-spool/dead/``. This verb lets an admin read them,
put them back on the work queue once the cause is fixed, or delete them.

Spool: each letter is a file; its id is the file's name. A replay moves it
back into the spool by one rename; the running server takes it up within
its refresh interval (30 s), a stopped one at its start.

RabbitMQ: a message in a queue has no address, so the command reads the
queue with ``basic.get`` without acking, holding every letter it read
(never more than the queue held when it started), acts on the chosen ones
and then returns the others with one ``basic.nack`` (requeue). A classic
queue puts requeued messages back in their place, so the order is kept; a
command that is killed loses its connection and the broker requeues
everything it held, so nothing is lost. A letter's id is its
``x-mailhub-dead-id`` header (set when mailhub dead-letters it), or, for a
letter without one, ``h`` and a hash of its body and reason. A replay
publishes the body (properties kept, the dead-letter headers removed) to the
work queue with publisher confirms, and acks the letter only after the
broker confirmed the publication: if the command dies between the two, the
letter is in both queues (collecting it twice creates nothing twice).

Why txamqp on the reactor (``task.react``, as ``mailhub check``) rather than
a blocking client: it is the AMQP client mailhub already has and configures
(``[amqp] url``, ``spec``, TLS, the frame codec that reads any client's
headers), so the command sees the broker exactly as the server does, with no
second client library to install.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from txamqp.client import ChannelClosed

from mailhub.cli.common import BAD, IO, OK, UNREACHABLE, Exit, table
from mailhub.config import Config
from mailhub.pubsub.deadletters import (
    AT_HEADER, ID_HEADER, QUEUE_HEADER, REASON_HEADER, DeadLetter, SpoolDeadLetters, when_text,
)

#: Our headers, removed from a letter that is replayed.
DEAD_HEADERS = (REASON_HEADER, QUEUE_HEADER, ID_HEADER, AT_HEADER)

#: The spool's folder under ``[mailhub] data`` (as mailhub.tap names it).
SPOOL = "collector-spool"


def add_arguments(verbs: Any, config_option: argparse.ArgumentParser,
                  kind: Any) -> None:
    """Register ``dead`` and its actions on the top parser's ``verbs``."""
    text = "the collector's dead letters (messages that can never be collected)"
    dead = verbs.add_parser("dead", help=text, description=text, parents=[config_option])
    actions = dead.add_subparsers(dest="action", metavar="ACTION", parser_class=kind)
    actions.required = True

    def action(name: str, run: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help, parents=[config_option])
        sub.set_defaults(run=run)
        return sub

    action("list", dead_list, "one line per dead letter: id, when, reason, user and "
                              "address count")
    show = action("show", dead_show, "the whole dead letter: reason, properties, body")
    show.add_argument("id", metavar="ID")
    for name, run, verb in (("replay", dead_replay, "put back on the work queue"),
                            ("drop", dead_drop, "delete")):
        sub = action(name, run, "%s the dead letter ID, or every one (--all)" % verb)
        sub.add_argument("id", metavar="ID", nargs="?", default=None)
        sub.add_argument("--all", action="store_true", help="every dead letter")


# -- the spool --------------------------------------------------------------------


def spool_of(config: Config) -> SpoolDeadLetters:
    """The dead letters of the server's collector spool (no broker)."""
    return SpoolDeadLetters(config.data_dir.absolute() / SPOOL)


def _where(config: Config) -> str:
    if config.amqp.url:
        return "queue %s" % config.collector.dead_letter
    return str(spool_of(config).dead_folder)


# -- RabbitMQ ---------------------------------------------------------------------


def letter_id(body: bytes, headers: dict[str, Any]) -> str:
    """The id of a letter on RabbitMQ: its ``x-mailhub-dead-id``, or a content hash."""
    found = headers.get(ID_HEADER)
    if isinstance(found, bytes):
        found = found.decode("utf-8", "replace")
    if found:
        return str(found)
    digest = hashlib.sha256(body + b"\0" + str(headers.get(REASON_HEADER, "")).encode())
    return "h" + digest.hexdigest()[:11]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Confirms:
    """What the connection tells its session: publisher confirms of our channel."""

    def __init__(self) -> None:
        self.acked = 0
        self.nacked = False
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def confirmed(self, channel: Any, tag: int, multiple: bool, ok: bool) -> None:
        if not ok:
            self.nacked = True
        self.acked = max(self.acked, tag)
        still = []
        for wanted, d in self._waiting:
            if wanted <= self.acked:
                d.callback(None)
            else:
                still.append((wanted, d))
        self._waiting = still

    def channel_failed(self, channel: Any, reason: Any) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(reason)

    def wait(self, tag: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if tag <= self.acked:
            d.callback(None)
        else:
            self._waiting.append((tag, d))
        return d


def _constant(value: str) -> Callable[[], str]:
    """A function that answers ``value`` (the AMQP factory asks for its vhost)."""
    return lambda: value


class BrokerDeadLetters:
    """The dead-letter queue on RabbitMQ, read and changed as the module says."""

    def __init__(self, reactor: Any, url: str, spec: str, dead_queue: str, work_queue: str,
                 timeout: float = 30.0) -> None:
        from mailhub.pubsub.connection import load_spec, parse_urls

        self.reactor = reactor
        #: The nodes of ``[amqp] url``, tried in turn (one cluster's nodes).
        self.addresses = parse_urls(url)
        self.spec = load_spec(spec)
        self.dead_queue = dead_queue
        self.work_queue = work_queue
        self.timeout = timeout
        self.client: Any = None
        self._get: Any = None
        self._publish: Any = None
        self._published = 0
        self._confirms = _Confirms()
        #: Delivery tags of the letters read and not yet settled.
        self._held: dict[str, list[int]] = {}

    async def open(self) -> None:
        """Connect, log in, open the reading channel and the confirm-mode one."""
        from mailhub.pubsub.connection import _Factory

        errors = []
        for address in self.addresses:
            factory = _Factory(self.spec, _constant(address.vhost), 0, self.reactor,
                               "mailhub dead")
            endpoint = address.endpoint(self.reactor, timeout=self.timeout)
            try:
                self.client = await endpoint.connect(factory)
                await self.client.authenticate(address.username, address.password,
                                               mechanism="PLAIN").addTimeout(self.timeout,
                                                                             self.reactor)
                break
            except Exception as e:
                errors.append("%s: %s" % (address.where, _reason(e)))
                if self.client is not None:
                    self.client.transport.loseConnection()
                    self.client = None
        else:
            raise Exit(UNREACHABLE, "cannot reach RabbitMQ at %s" % "; ".join(errors))
        self.client.attach_session(self._confirms)
        self._get = await self._channel(1)
        self._publish = await self._channel(2)
        await self._publish.confirm_select()

    async def _channel(self, number: int) -> Any:
        channel = await self.client.channel(number)
        await channel.channel_open()
        return channel

    async def close(self) -> None:
        """Return what is held (requeued, in place) and close the connection."""
        if self.client is None:
            return
        try:
            if self._held and self._get is not None:
                await self._get.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            self._held = {}
            await self.client.close(within=2)
        except Exception:
            # The broker requeues what we held when the connection goes.
            self.client.transport.loseConnection()
        self.client = None

    async def _count(self, queue: str) -> int | None:
        """Messages in ``queue`` (passive declare), None when there is no such queue."""
        channel = await self._channel(3)
        try:
            reply = await channel.queue_declare(queue=queue, passive=True)
        except ChannelClosed:  # 404: no such queue (the channel is closed with it)
            self.client.channels.pop(3, None)
            return None
        await channel.channel_close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
        self.client.channels.pop(3, None)
        return int(reply.message_count)

    async def read(self, stop: Callable[[DeadLetter], bool] | None = None) -> list[DeadLetter]:
        """The letters, oldest first, held unacked; at most as many as the
        queue had now; stops after the first for which ``stop`` is true."""
        count = await self._count(self.dead_queue)
        letters: list[DeadLetter] = []
        if not count:
            return letters
        for _ in range(count):
            message = await self._get.basic_get(queue=self.dead_queue, no_ack=False)
            if message.method.name != "get-ok":
                break
            content = message.content
            properties = dict(content.properties) if content is not None else {}
            body = content.body if content is not None else b""
            if isinstance(body, str):
                body = body.encode("utf-8")
            headers = dict(properties.get("headers") or {})
            found = letter_id(body, headers)
            at = headers.get(AT_HEADER)
            letter = DeadLetter(found, float(at) if isinstance(at, (int, float)) else None,
                                _text(headers.get(REASON_HEADER, "(no reason recorded)")),
                                body, properties)
            self._held.setdefault(found, []).append(message.delivery_tag)
            letters.append(letter)
            if stop is not None and stop(letter):
                break
        return letters

    async def replay(self, letter: DeadLetter) -> None:
        """Publish ``letter`` to its work queue, confirmed; then ack it."""
        properties = dict(letter.properties)
        headers = {k: v for k, v in dict(properties.get("headers") or {}).items()
                   if k not in DEAD_HEADERS}
        properties["headers"] = headers
        properties["delivery-mode"] = 2
        queue = _text(dict(letter.properties.get("headers") or {}).get(
            QUEUE_HEADER, self.work_queue))
        from txamqp.content import Content

        self._published += 1
        await self._publish.basic_publish(exchange="", routing_key=queue,
                                          content=Content(letter.body, properties=properties))
        await self._confirms.wait(self._published).addTimeout(self.timeout, self.reactor)
        if self._confirms.nacked:
            raise Exit(UNREACHABLE, "RabbitMQ refused the replay of %s" % letter.id)
        await self.ack(letter)

    async def ack(self, letter: DeadLetter) -> None:
        """Remove ``letter`` from the dead-letter queue."""
        tags = self._held.get(letter.id) or []
        if not tags:
            return
        await self._get.basic_ack(delivery_tag=tags.pop(0), multiple=False)
        if not tags:
            del self._held[letter.id]

    async def check_work_queue(self, letters: Iterable[DeadLetter]) -> None:
        """Exit(1) unless every queue the letters go back to exists (a publication
        to a missing queue would be confirmed and lost)."""
        queues = {_text(dict(letter.properties.get("headers") or {}).get(
            QUEUE_HEADER, self.work_queue)) for letter in letters}
        for queue in sorted(queues):
            if await self._count(queue) is None:
                raise Exit(BAD, "the work queue %s does not exist on the broker: start "
                                "mailhub once (it declares it), then replay" % queue)


def _reason(error: BaseException) -> str:
    from mailhub.pubsub.connection import _reply_text

    return _reply_text(error) or type(error).__name__


def _with_broker(config: Config, work: Callable[[BrokerDeadLetters], Any]) -> int:
    """Run ``work`` (a coroutine function) on a broker connection under task.react."""
    broker = BrokerDeadLetters(None, config.amqp.url, config.amqp.spec,
                               config.collector.dead_letter, config.collector.queue)
    code: list[int] = []
    failure: list[BaseException] = []

    async def run(reactor: Any) -> None:
        broker.reactor = reactor
        try:
            await broker.open()
            code.append(await work(broker))
        except Exit as e:
            failure.append(e)
        finally:
            await broker.close()

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit:
        pass
    if failure:
        raise failure[0]
    if not code:
        raise Exit(UNREACHABLE, "the dead letters could not be read (see the log above)")
    return code[0]


# -- the actions ------------------------------------------------------------------


def _print_list(letters: list[DeadLetter], io: IO) -> None:
    rows = [["ID", "WHEN", "REASON", "SUMMARY"]]
    for letter in letters:
        reason = " ".join(letter.reason.split())
        if len(reason) > 50:
            reason = reason[:47] + "..."
        rows.append([letter.id, when_text(letter.when), reason, letter.summary()])
    table(rows, io.stdout)


def dead_list(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Print one line per dead letter, oldest first."""
    if not config.amqp.url:
        letters = list(spool_of(config).letters())
    else:
        async def work(broker: BrokerDeadLetters) -> int:
            letters[:] = await broker.read()
            return OK
        letters = []
        _with_broker(config, work)
    if not letters:
        io.stdout.write("no dead letters in %s\n" % _where(config))
        return OK
    _print_list(letters, io)
    return OK


def _print_letter(letter: DeadLetter, io: IO, where: str) -> None:
    io.stdout.write("id:       %s\nwhen:     %s\nwhere:    %s\nreason:   %s\n"
                    % (letter.id, when_text(letter.when), where, letter.reason))
    io.stdout.write("summary:  %s\n" % letter.summary())
    if letter.properties:
        io.stdout.write("properties: %s\n" % json.dumps(
            letter.properties, default=_text, sort_keys=True))
    try:
        body = json.dumps(json.loads(letter.body), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        body = letter.body.decode("utf-8", "backslashreplace")
    io.stdout.write("\n%s\n" % body)


def dead_show(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Print one dead letter whole: reason, AMQP properties, the body."""
    found: list[DeadLetter] = []
    if not config.amqp.url:
        letter = spool_of(config).find(args.id)
        if letter is not None:
            found.append(letter)
    else:
        async def work(broker: BrokerDeadLetters) -> int:
            letters = await broker.read(stop=lambda letter: letter.id == args.id)
            found.extend(letter for letter in letters if letter.id == args.id)
            return OK
        _with_broker(config, work)
    if not found:
        raise Exit(BAD, "no dead letter %s in %s" % (args.id, _where(config)))
    _print_letter(found[0], io, _where(config))
    return OK


def _chosen(args: argparse.Namespace) -> str | None:
    if args.all == (args.id is not None):
        raise Exit(BAD, "give a dead letter's ID or --all (mailhub dead list shows the ids)")
    return None if args.all else str(args.id)


def _settle(config: Config, args: argparse.Namespace, io: IO, replay: bool) -> int:
    wanted = _chosen(args)
    done: list[str] = []
    verb = "replayed" if replay else "dropped"
    if not config.amqp.url:
        spool = spool_of(config)
        if wanted is None:
            ids = [letter.id for letter in spool.letters()]
        else:
            letter = spool.find(wanted)
            ids = [letter.id] if letter is not None else []
        for found in ids:
            if (spool.replay(found) is not None) if replay else spool.drop(found):
                done.append(found)
                io.stdout.write("%s %s\n" % (verb, found))
    else:
        async def work(broker: BrokerDeadLetters) -> int:
            letters = await broker.read(
                stop=None if wanted is None else (lambda letter: letter.id == wanted))
            chosen = [letter for letter in letters if wanted is None or letter.id == wanted]
            if replay:
                await broker.check_work_queue(chosen)
            for letter in chosen:
                if replay:
                    await broker.replay(letter)
                else:
                    await broker.ack(letter)
                done.append(letter.id)
                io.stdout.write("%s %s\n" % (verb, letter.id))
            return OK
        _with_broker(config, work)
    if wanted is not None and not done:
        raise Exit(BAD, "no dead letter %s in %s" % (wanted, _where(config)))
    if wanted is None:
        io.stdout.write("%s %d dead letters\n" % (verb, len(done)))
    return OK


def dead_replay(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Put one dead letter (or all) back on the work queue, then remove it."""
    return _settle(config, args, io, replay=True)


def dead_drop(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Delete one dead letter (or all)."""
    return _settle(config, args, io, replay=False)


__all__ = ["add_arguments", "dead_list", "dead_show", "dead_replay", "dead_drop",
           "BrokerDeadLetters", "letter_id", "spool_of"]
