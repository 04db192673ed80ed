import Foundation
import PostgresNIO

/// The tables whose rows a worker leases: `lease_owner` and `lease_expires_at`, with `attempts`
/// as the fence (a worker whose lease expired cannot touch the row's next attempt).
enum LeasedTable: String {
    case deliveries
    case digestRuns = "digest_runs"
    case jobs
    case schedules
}

extension TenantTransaction {
    /// Extends the leases `worker` still holds on the rows `ids` (at the attempts `attempts`) of
    /// `table` (the heartbeat), fenced like completion; returns how many it extended.
    @discardableResult
    func extendLeases(_ table: LeasedTable, ids: [UUID], attempts: [Int], worker: String, leaseSeconds: Int) async throws -> Int {
        // extend_leases (0032): each row by its key, whatever the statistics say of the organisation.
        try await query(
            "SELECT extend_leases(\(table.rawValue), \(worker), \(ids)::uuid[], \(attempts)::integer[], \(leaseSeconds)::integer)"
        )[0].decode(Int.self)
    }
}
