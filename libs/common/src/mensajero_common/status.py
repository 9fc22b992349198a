"""The rules by which a message's status may change.

Outgoing messages move forward along pending → assigned → sending → sent → delivered;
`failed` and `expired` end a message from any state that is not final. Nothing leaves a
final state, so a late or repeated report never undoes a newer one.
"""

from mensajero_common.models import MessageStatus

OUTGOING_ORDER: tuple[MessageStatus, ...] = (
    MessageStatus.PENDING,
    MessageStatus.ASSIGNED,
    MessageStatus.SENDING,
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
)

FINAL_STATUSES = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
        MessageStatus.RECEIVED,
    }
)

# Statuses a phone may report in an `sms_report` frame.
REPORTABLE_STATUSES = frozenset(
    {
        MessageStatus.SENDING,
        MessageStatus.SENT,
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
    }
)

# Statuses of a message whose task a device holds: assigned to it, or acknowledged.
IN_FLIGHT_STATUSES = frozenset({MessageStatus.ASSIGNED, MessageStatus.SENDING})

# The column that records when a message entered each status.
TIMESTAMP_COLUMNS: dict[MessageStatus, str] = {
    MessageStatus.ASSIGNED: "assigned_at",
    MessageStatus.SENDING: "sending_at",
    MessageStatus.SENT: "sent_at",
    MessageStatus.DELIVERED: "delivered_at",
    MessageStatus.FAILED: "failed_at",
    MessageStatus.EXPIRED: "failed_at",
    MessageStatus.RECEIVED: "received_at",
}


def can_transition(current: MessageStatus, new: MessageStatus) -> bool:
    """Tell whether an outgoing message in `current` may move to `new`."""
    if current in FINAL_STATUSES:
        return False
    if new in (MessageStatus.FAILED, MessageStatus.EXPIRED):
        return True
    if new not in OUTGOING_ORDER or current not in OUTGOING_ORDER:
        return False
    return OUTGOING_ORDER.index(new) > OUTGOING_ORDER.index(current)


def predecessors(new: MessageStatus) -> frozenset[MessageStatus]:
    """Return every status from which a message may move to `new`.

    Updates use this in their WHERE clause, so the rule holds under concurrent writers.
    """
    return frozenset(status for status in MessageStatus if can_transition(status, new))
