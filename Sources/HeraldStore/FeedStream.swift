import Foundation
import HeraldCore
import PostgresNIO

/// What one numbered change of a user's feed was (migration 0010, `feed_changes.kind`).
public enum FeedChangeKind: String, Sendable, Codable, CaseIterable, StoredWord {
    case created
    case read
    case unread
    case archived
    case deleted
    case cleared
    case expired
    case readAll = "read_all"
}

/// One numbered change of a user's feed, with the row as it is now (nil when the change names no
/// row, or the row is gone, not yet visible or expired).
public struct LoggedFeedChange: Sendable, Equatable {
    public var seq: Int64
    public var kind: FeedChangeKind
    public var notificationID: UUID?
    public var item: FeedItem?
    /// When the change was logged (near its commit).
    public var loggedAt: Date
}

/// Where a user's change log stands: the last number given, and the last one removed by the
/// retention window (a client asking for changes after an older number must resynchronise).
public struct FeedStreamPosition: Sendable, Equatable {
    public var seq: Int64
    public var purgedThrough: Int64

    public init(seq: Int64, purgedThrough: Int64) {
        self.seq = seq
        self.purgedThrough = purgedThrough
    }
}

/// Who a redeemed stream ticket stands for.
public struct StreamTicketHolder: Sendable, Equatable {
    public var userID: UUID
    public var sessionID: UUID?
}

extension TenantTransaction {
    /// The user's position in their change log (0, 0 before their first change).
    public func feedStreamPosition(of userID: UUID) async throws -> FeedStreamPosition {
        let rows = try await query(
            "SELECT seq, purged_through FROM feed_streams WHERE organisation_id = \(organisationID) AND user_id = \(userID)")
        guard let row = rows.first else { return FeedStreamPosition(seq: 0, purgedThrough: 0) }
        let (seq, purged) = try row.decode((Int64, Int64).self, table: "feed_streams")
        return FeedStreamPosition(seq: seq, purgedThrough: purged)
    }

    /// Up to `limit` changes after `seq`, oldest first, each with its row as it is at `now`
    /// (nil once expired or deleted). The log says when a row went on show (migration 0010), so
    /// visible_at is not checked again: the notify clock may run a little ahead of this one.
    public func feedChanges(of userID: UUID, after seq: Int64, limit: Int, now: Date) async throws -> [LoggedFeedChange] {
        let changes = try await query(
            """
            SELECT seq, kind, notification_id, created_at FROM feed_changes
            WHERE organisation_id = \(organisationID) AND user_id = \(userID) AND seq > \(seq)
            ORDER BY seq LIMIT \(limit)
            """
        ).map { row in
            let (seq, kind, notification, logged) = try row.decode((Int64, FeedChangeKind, UUID?, Date).self, table: "feed_changes")
            return LoggedFeedChange(seq: seq, kind: kind, notificationID: notification, item: nil, loggedAt: logged)
        }
        let ids = Array(Set(changes.compactMap(\.notificationID)))
        guard !ids.isEmpty else { return changes }
        let rows = try await query(
            """
            \(unescaped: feedSelect)
            WHERE n.organisation_id = \(organisationID) AND n.user_id = \(userID) AND n.id = ANY(\(ids)::uuid[])
              AND (n.expires_at IS NULL OR n.expires_at > \(now))
            """)
        let items = Dictionary(uniqueKeysWithValues: try rows.map(decodeFeedItem).map { ($0.id, $0) })
        return changes.map { change in
            var change = change
            change.item = change.notificationID.flatMap { items[$0] }
            return change
        }
    }

    /// Records a ticket (only the hash of its secret) for `userID`, valid until `expiresAt`.
    public func createStreamTicket(id: UUID, userID: UUID, sessionID: UUID?, secretHash: Data, expiresAt: Date) async throws {
        try await query(
            """
            INSERT INTO stream_tickets (organisation_id, id, user_id, session_id, secret_hash, expires_at)
            VALUES (\(organisationID), \(id), \(userID), \(sessionID), \(secretHash), \(expiresAt))
            """)
    }

    /// Uses a ticket up: nil when it is unknown, already used, expired or its secret is wrong.
    public func redeemStreamTicket(id: UUID, secretHash: Data, now: Date) async throws -> StreamTicketHolder? {
        let rows = try await query(
            """
            UPDATE stream_tickets SET used_at = \(now)
            WHERE organisation_id = \(organisationID) AND id = \(id) AND secret_hash = \(secretHash)
              AND used_at IS NULL AND expires_at > \(now)
            RETURNING user_id, session_id
            """)
        guard let row = rows.first else { return nil }
        let (user, session) = try row.decode((UUID, UUID?).self, table: "stream_tickets")
        return StreamTicketHolder(userID: user, sessionID: session)
    }

    /// Whether the session (refresh-token family) has a token that is neither revoked nor expired.
    public func sessionIsLive(_ sessionID: UUID, of userID: UUID, now: Date) async throws -> Bool {
        let rows = try await query(
            """
            SELECT EXISTS (SELECT 1 FROM refresh_tokens
                           WHERE organisation_id = \(organisationID) AND family_id = \(sessionID) AND user_id = \(userID)
                             AND revoked_at IS NULL AND expires_at > \(now))
            """)
        return try rows.first?.decode(Bool.self) ?? false
    }
}

extension Database {
    /// Logs the rows whose deliver_at or expiry has come by `now` and removes changes older than
    /// `retention`, across organisations (`feed_stream_sweep`); returns how many rows it logged.
    /// `organisation` confines it to one organisation (tests).
    public func sweepFeedStreams(limit: Int, retention: Duration, now: Date, organisation: UUID? = nil) async throws -> Int {
        let seconds = Int(retention.components.seconds)
        return try await query(
            "SELECT feed_stream_sweep(\(limit)::int, make_interval(secs => \(seconds)), \(now), \(organisation))"
        ).first?.decode(Int.self) ?? 0
    }
}
