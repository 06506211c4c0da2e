"""Two speed-ups of the pipeline runtime over gloo, kept apart from the interpreter
(:func:`labkit.pipeline.runtime.run_schedule`, ``prefetch=True``). Neither changes a result; they change
when messages move and how long sent tensors are held.

1. **Post each receive one compute action early.** gloo moves a message only once its receive is posted,
   so a receive posted just in time costs a round trip even when the sender finished long ago. Posted
   before the F or B that precedes it, the message arrives while the rank computes, and a RECV in the
   timeline is only the time the rank really waited.
2. **Free a sent tensor once the schedule proves it delivered.** gloo cannot say whether an ``isend`` has
   completed without waiting on it, but the schedule can: a peer posts its messages in list order and
   waits for each receive before it moves on. So when the peer's message M reaches us, every receive the
   peer does before sending M is done, and our sends that match them have completed. Without this a 1F1B
   stage would hold every output it sent until the end of the step.
"""

from __future__ import annotations

from labkit.pipeline.schedules import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule

__all__ = ["Prefetch", "sends_known_done"]


def _partner(a: Action) -> Action:
    """The other end of a message: the receive that matches a send, or the send that matches a receive."""
    s, k = a.stage, a.microbatch
    return {SEND_F: Action(RECV_F, k, s + 1), RECV_F: Action(SEND_F, k, s - 1),
            SEND_B: Action(RECV_B, k, s - 1), RECV_B: Action(SEND_B, k, s + 1)}[a.kind]


def sends_known_done(schedule: Schedule, me: int) -> dict:
    """{receive of rank ``me``: its sends that are surely complete once that message has arrived} (speed-up 2)."""
    where = {a: (r, i) for r, actions in enumerate(schedule.actions) for i, a in enumerate(actions)}
    mine = schedule.actions[me]
    done = {}
    for a in mine:
        if a.kind in (RECV_F, RECV_B):
            peer, sent_at = where[_partner(a)]
            done[a] = [b for b in mine if b.kind in (SEND_F, SEND_B) and where[_partner(b)][0] == peer
                       and where[_partner(b)][1] < sent_at]
    return done


class Prefetch:
    """Both speed-ups for one rank's step; ``rank`` is the interpreter's state (its ``post_receive`` and its
    ``sending`` dict)."""

    def __init__(self, schedule: Schedule, me: int, rank):
        self.actions, self.rank = schedule.actions[me], rank
        self.known_done = sends_known_done(schedule, me)

    def before(self, i: int, a: Action) -> None:
        """Before a compute action: post the next receive of the list (speed-up 1)."""
        if a.kind in (F, B):
            following = next((b for b in self.actions[i + 1:] if b.kind in (RECV_F, RECV_B)), None)
            if following is not None:
                self.rank.post_receive(following)

    def after(self, a: Action) -> None:
        """After a receive: wait for the sends it proves complete (an instant wait) and let their tensors go."""
        for done in self.known_done.get(a, ()):
            if done in self.rank.sending:
                self.rank.sending.pop(done)[0].wait()
