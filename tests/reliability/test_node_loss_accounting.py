"""FedTuneAvg's view of node loss, without processes: the SuperLink answers for a lost node (as node 1),
a silent node times out; both land in the round's `failed` list under the lost node's id."""

from flwr.app import Error, Message

from tests.unit.test_strategy import _message_identity, configure, make_strategy, record, reply_to

__all__ = ["_message_identity"]  # the autouse fixture, re-exported for this module


def superlink_error_for(sent: Message) -> Message:
    reply = Message(Error(code=0, reason="Message unavailable: the node went offline"), reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = 1  # what Flower's SuperLink puts in the error reply it inserts
    return reply


def test_superlink_inserted_error_is_attributed_to_the_lost_node(tmp_path, caplog):
    strategy, _ = make_strategy(tmp_path)
    sent = configure(strategy)
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], record(1.0, 1.0), 5), superlink_error_for(sent[1])])
    assert arrays is not None
    rec = strategy.results.results.rounds[0]
    assert rec.failed == [22] and rec.replied == [11] and rec.aggregated
    assert rec.bytes_up * 2 == rec.bytes_down  # only the survivor's update arrived
    assert rec.nodes["22"].status == "failed"
    assert "node 22 failed: Message unavailable" in caplog.text
    assert "lost 1 of 2 sampled nodes (22); aggregating the 1 accepted replies" in caplog.text


def test_a_node_silent_past_the_round_timeout_is_failed(tmp_path, caplog):
    strategy, _ = make_strategy(tmp_path)
    sent = configure(strategy)
    strategy.aggregate_train(1, [reply_to(sent[0], record(1.0, 1.0), 5)])
    assert strategy.results.results.rounds[0].failed == [22]
    assert "node 22 failed: no reply within strategy.round-timeout" in caplog.text
