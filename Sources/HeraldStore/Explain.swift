import Foundation
import HeraldCore
import PostgresNIO

/// One user of an event's trace, with the live state of what the engine created.
public struct ExplainedRecipient: Sendable, Equatable {
    public var userID: UUID
    public var email: String
    public var displayName: String
    public var targeted: Bool
    public var rule: String
    public var reason: ReasonCode
    public var channels: [TraceChannelRecord]
    /// Current status of each delivery the engine queued (PENDING, SENT, CANCELLED, …).
    public var deliveryStatus: [UUID: DeliveryStatus]
    /// When each delivery still waiting (PENDING or FAILED) is due: the end of the user's quiet
    /// hours, or a retry's time.
    public var deliveryDue: [UUID: Date] = [:]
    /// Current state of each digest item.
    public var digestStatus: [UUID: DigestItemStatus]
    /// Each digest item's slot, run and drop reason.
    public var digests: [UUID: ExplainedDigestItem] = [:]
    /// Current state of each in-app row, `deleted` once the user deleted it.
    public var notificationStatus: [UUID: FeedItemStatus] = [:]
}

/// A digest item as explain shows it: its state, the slot it is due at, why it was dropped, and
/// the run it joined.
public struct ExplainedDigestItem: Sendable, Equatable {
    public var status: DigestItemStatus
    public var dueAt: Date
    public var droppedReason: DigestDrop?
    public var run: DigestRunSummary?
}

/// The run a digest item joined.
public struct DigestRunSummary: Sendable, Equatable {
    public var id: UUID
    public var status: DigestRunStatus
    public var slotAt: Date
    public var attempts: Int
    public var sentAt: Date?
    public var lastError: String?
}

extension ExplainedRecipient {
    /// A dry run's recipient: the planner's decisions for `trace`, naming no rows (a dry run
    /// creates none).
    public init(planned trace: RecipientTrace, user: User?) {
        self.init(
            userID: trace.targeting.userID, email: user?.email ?? "", displayName: user?.displayName ?? "",
            targeted: trace.targeting.targeted, rule: trace.targeting.rule, reason: trace.targeting.reason,
            channels: trace.channels.map { TraceChannelRecord(TracedChannel(decision: $0.decision)) }, deliveryStatus: [:],
            digestStatus: [:])
    }
}

extension TenantTransaction {
    /// The trace of an event, by user id, optionally for one user.
    public func explain(
        eventID: UUID, userID: UUID?, limit: Int, after: UUID?, now: Date = Date()
    ) async throws -> (items: [ExplainedRecipient], next: UUID?) {
        let event = try await event(eventID)
        // Every in-app row of an event is shown at its deliver_at, and a cancellation deletes the
        // rows not shown yet; the user can delete only rows shown; purge-expired deletes rows
        // past their expires_at (the event's). So a row missing from a cancelled event whose time
        // had not come was withdrawn, one of an event that has expired was purged (or deleted by
        // its user before: the store no longer says which), any other was deleted by its user.
        let missing: FeedItemStatus =
            if let cancelled = event.cancelledAt, event.deliverAt > cancelled {
                .withdrawn
            } else if let expiry = event.expiresAt, expiry <= now {
                .expired
            } else {
                .deleted
            }
        // The recipients with a row of their own and those of the event's runs (0069), each side
        // in user order up to the page, merged. The runs of an event do not overlap, so their
        // users in order are the runs by first user, each one's ids in order: a page unnests the
        // first run it reaches and the next ones until they hold a page (`before`, the users of
        // the runs ahead, counted from the second), and reads each recipient's rows' ids alone
        // (`records` is bytea stored uncompressed, so a slice reads only its bytes).
        let page = limit + 1
        let rows = try await query(
            """
            WITH own AS (
                SELECT r.user_id, r.targeted, r.rule, r.reason, r.channels, r.decision_id, r.record_ids
                FROM event_recipients r
                WHERE r.organisation_id = \(organisationID) AND r.event_id = \(eventID) AND (\(userID)::uuid IS NULL OR r.user_id = \(userID))
                  AND (\(after)::uuid IS NULL OR r.user_id > \(after))
                ORDER BY r.user_id
                LIMIT \(page)
            ), reached AS (
                SELECT s.first_user, row_number() OVER w AS n, sum(s.size) OVER w - s.size - first_value(s.size) OVER w AS before
                FROM event_recipient_runs s
                WHERE s.organisation_id = \(organisationID) AND s.event_id = \(eventID)
                  AND (\(after)::uuid IS NULL OR s.last_user > \(after))
                  AND (\(userID)::uuid IS NULL OR (s.first_user <= \(userID) AND s.last_user >= \(userID)))
                WINDOW w AS (ORDER BY s.first_user)
            ), taken AS (
                SELECT s.first_user, x.user_id, x.at::integer AS at
                FROM reached k
                JOIN event_recipient_runs s ON s.organisation_id = \(organisationID) AND s.event_id = \(eventID) AND s.first_user = k.first_user
                CROSS JOIN LATERAL unnest(s.user_ids) WITH ORDINALITY AS x(user_id, at)
                WHERE (k.n = 1 OR k.before < \(page))
                  AND (\(after)::uuid IS NULL OR x.user_id > \(after)) AND (\(userID)::uuid IS NULL OR x.user_id = \(userID))
                ORDER BY s.first_user, x.at
                LIMIT \(page)
            ), shared AS (
                SELECT t.user_id, s.targeted, s.rule, s.reason, '[]'::jsonb AS channels, s.decision_id,
                       ARRAY(SELECT encode(substring(s.records FROM ((t.at - 1) * s.records_each + i) * 16 + 1 FOR 16), 'hex')::uuid
                             FROM generate_series(0, s.records_each - 1) AS i ORDER BY i) AS record_ids
                FROM taken t
                JOIN event_recipient_runs s ON s.organisation_id = \(organisationID) AND s.event_id = \(eventID) AND s.first_user = t.first_user
            )
            SELECT r.user_id, u.email, u.display_name, r.targeted, r.rule, r.reason, r.channels, d.channels, r.record_ids
            FROM (SELECT * FROM own UNION ALL SELECT * FROM shared) r
            JOIN users u ON u.organisation_id = \(organisationID) AND u.id = r.user_id
            LEFT JOIN event_decisions d ON d.organisation_id = \(organisationID) AND d.id = r.decision_id
            ORDER BY r.user_id
            LIMIT \(page)
            """)
        var items: [ExplainedRecipient] = try rows.prefix(limit).map { row in
            let (user, email, name, targeted, rule, reason, ownChannels, shared, recordIDs) =
                try row.decode(
                    (
                        UUID, String, String, Bool, String, ReasonCode, JSONDocument<[TraceChannelRecord]>,
                        JSONDocument<[SharedChannelDecision]>?, [UUID]?
                    ).self, table: "event_recipients")
            // Since 0028 a row names the decisions it shares and lists its own rows' ids.
            var ids = (recordIDs ?? [])[...]
            let channels = shared.map { $0.value.map { TraceChannelRecord($0, ids: &ids) } } ?? ownChannels.value
            return ExplainedRecipient(
                userID: user, email: email, displayName: name, targeted: targeted, rule: rule,
                reason: reason, channels: channels, deliveryStatus: [:], digestStatus: [:])
        }
        let notificationIDs = items.flatMap { $0.channels.compactMap(\.notificationID) }
        var notifications: [UUID: FeedItemStatus] = [:]
        if !notificationIDs.isEmpty {
            for row in try await query(
                """
                SELECT n.id, CASE WHEN n.visible_at > \(now) THEN 'SCHEDULED' WHEN n.expires_at <= \(now) THEN 'EXPIRED'
                            WHEN n.archived_at IS NOT NULL THEN 'ARCHIVED'
                            WHEN notification_read(n, fs) THEN 'READ' ELSE 'UNREAD' END
                FROM notifications n LEFT JOIN feed_state fs ON fs.organisation_id = n.organisation_id AND fs.user_id = n.user_id
                WHERE n.organisation_id = \(organisationID) AND n.id = ANY(\(notificationIDs)::uuid[])
                """)
            {
                let (id, status) = try row.decode((UUID, FeedItemStatus).self, table: "notifications")
                notifications[id] = status
            }
        }
        let deliveryIDs = items.flatMap { $0.channels.flatMap(\.deliveryIDs) }
        let digestIDs = items.flatMap { $0.channels.compactMap(\.digestItemID) }
        var deliveries: [UUID: DeliveryStatus] = [:]
        var due: [UUID: Date] = [:]
        if !deliveryIDs.isEmpty {
            for row in try await query(
                """
                SELECT id, status, next_attempt_at FROM deliveries
                WHERE organisation_id = \(organisationID) AND id = ANY(\(deliveryIDs)::uuid[])
                """)
            {
                let (id, status, next) = try row.decode((UUID, DeliveryStatus, Date).self, table: "deliveries")
                deliveries[id] = status
                if status == .pending || status == .failed { due[id] = next }
            }
        }
        var digests: [UUID: ExplainedDigestItem] = [:]
        if !digestIDs.isEmpty {
            for row in try await query(
                """
                SELECT i.id, CASE WHEN i.cancelled_at IS NOT NULL THEN 'CANCELLED' WHEN i.sent_at IS NOT NULL THEN 'SENT'
                                  WHEN i.dropped_reason IS NOT NULL THEN 'DROPPED' ELSE 'PENDING' END,
                       i.slot_at, i.dropped_reason, r.id, r.status, r.slot_at, r.attempts, r.sent_at, r.last_error
                FROM digest_items i
                LEFT JOIN digest_runs r ON r.organisation_id = i.organisation_id AND r.id = i.run_id
                WHERE i.organisation_id = \(organisationID) AND i.id = ANY(\(digestIDs)::uuid[])
                """)
            {
                let (id, status, due, dropped, runID, runStatus, runSlot, attempts, sent, error) = try row.decode(
                    (UUID, DigestItemStatus, Date, String?, UUID?, DigestRunStatus?, Date?, Int?, Date?, String?).self,
                    table: "digest_items")
                var run: DigestRunSummary?
                if let runID, let runStatus, let runSlot {
                    run = DigestRunSummary(
                        id: runID, status: runStatus, slotAt: runSlot, attempts: attempts ?? 0, sentAt: sent, lastError: error)
                }
                digests[id] = ExplainedDigestItem(
                    status: status, dueAt: due, droppedReason: dropped.flatMap(DigestDrop.init(rawValue:)), run: run)
            }
        }
        for index in items.indices {
            for channel in items[index].channels {
                for id in channel.deliveryIDs {
                    items[index].deliveryStatus[id] = deliveries[id]
                    items[index].deliveryDue[id] = due[id]
                }
                if let id = channel.digestItemID {
                    items[index].digestStatus[id] = digests[id]?.status
                    items[index].digests[id] = digests[id]
                }
                if let id = channel.notificationID { items[index].notificationStatus[id] = notifications[id] ?? missing }
            }
        }
        return (items, rows.count > limit ? items.last?.userID : nil)
    }
}
