import Foundation
import PostgresNIO

/// One queue's and channel's backlog, across organisations (`outbox_backlog()`, 0067).
public struct BacklogFigure: Sendable, Equatable {
    /// `deliveries` or `digests`.
    public var queue: String
    public var channel: String
    /// Rows due and not taken.
    public var due: Int
    /// Rows waiting for a later time: a retry's backoff, quiet hours, a future `deliver_at`.
    public var waiting: Int
    /// Rows being sent (leased).
    public var sending: Int
    /// How long the oldest due row has waited; 0 when none is due.
    public var oldestDueSeconds: Double
}

extension Database {
    /// The outbox's backlog, for the workers' gauges; the worker role only. A channel of
    /// deliveries with nothing pending or being sent is absent; the digests' row is always there.
    public func outboxBacklog() async throws -> [BacklogFigure] {
        try await query("SELECT queue, channel, due, waiting, sending, oldest_due_seconds FROM outbox_backlog()").map { row in
            let (queue, channel, due, waiting, sending, oldest) = try row.decode(
                (String, String, Int, Int, Int, Double).self, table: "deliveries")
            return BacklogFigure(queue: queue, channel: channel, due: due, waiting: waiting, sending: sending, oldestDueSeconds: oldest)
        }
    }
}
