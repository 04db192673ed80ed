import Foundation
import PostgresNIO

/// The tables whose rows a worker leases: `lease_owner` and `lease_expires_at`, with `attempts`
/// as the fence (a worker whose lease expired cannot touch the row's next attempt).
enum LeasedTable: String {
    case deliveries
    case digestRuns = "digest_runs"
    case jobs
    case schedules

    /// What a row still held by its worker also says of itself.
    var held: String {
        switch self {
        case .deliveries, .digestRuns: "status = 'SENDING'"
        case .jobs: "status = 'RUNNING'"
        case .schedules: "lease_owner IS NOT NULL"
        }
    }
}

extension TenantTransaction {
    /// Extends the leases `worker` still holds on the rows `ids` (at the attempts `attempts`) of
    /// `table` (the heartbeat), fenced like completion; returns how many it extended.
    @discardableResult
    func extendLeases(_ table: LeasedTable, ids: [UUID], attempts: [Int], worker: String, leaseSeconds: Int) async throws -> Int {
        try await query(
            """
            UPDATE \(unescaped: table.rawValue) l SET lease_expires_at = now() + make_interval(secs => \(leaseSeconds)::integer)
            FROM unnest(\(ids)::uuid[], \(attempts)::integer[]) AS c(id, attempt)
            WHERE l.organisation_id = \(organisationID) AND l.id = c.id AND l.attempts = c.attempt AND l.lease_owner = \(worker)
              AND l.\(unescaped: table.held)
            RETURNING l.id
            """
        ).count
    }
}
