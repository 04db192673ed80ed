import Foundation
import HeraldCore
import HeraldStore

// A user's digest runs and what waits for their next digests, and the retry of a run that did
// not go (a product trial: eight digests sent and no route showed them, nor retried a DEAD one).
extension HeraldService {
    func listUserDigests(_ input: Operations.ListUserDigests.Input) async throws -> Operations.ListUserDigests.Output {
        let userID = try id(input.path.userId, "user")
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let (runs, waiting) = try await tenant { tx, _ in
            (try await tx.digestRuns(of: userID, limit: limit, after: cursor), try await tx.waitingDigests(of: userID))
        }
        return .ok(
            .init(
                body: .json(
                    .init(
                        items: try runs.items.map(Components.Schemas.DigestRun.init), nextCursor: runs.next?.encoded,
                        waiting: try waiting.map { .init(frequency: try mapped($0.frequency), slotAt: $0.slotAt, items: $0.items) }))))
    }

    func retryDigestRun(_ input: Operations.RetryDigestRun.Input) async throws -> Operations.RetryDigestRun.Output {
        let id = try id(input.path.runId, "digest run")
        let now = now()
        let run = try await tenant { tx, _ in
            let before = try await tx.digestRun(id)
            guard let after = try await tx.retryDigestRun(id, now: now) else {
                // The rule that refused it, from the run as it is now (a worker may have taken it).
                let current = try await tx.digestRun(id)
                let why =
                    if !TenantTransaction.retryableDigestRunStatuses.contains(current.status) {
                        "Only a DEAD or FAILED digest run can be retried; this one is \(current.status.rawValue)."
                    } else {
                        "This digest run has used \(current.attempts) attempts, the most a run may have (\(TenantTransaction.mostAttempts))."
                    }
                throw APIError.conflict(why)
            }
            try await tx.audit(
                action: "digest_run.retry", targetType: "digest_run", targetID: id.lowercased,
                before: try auditValue(["status": before.status]), after: try auditValue(["status": after.status]))
            return after
        }
        return .ok(.init(body: .json(try .init(run))))
    }
}

extension Components.Schemas.DigestRun {
    init(_ run: HeraldStore.DigestRun) throws {
        self.init(
            id: run.id.lowercased, userId: run.userID.lowercased, frequency: try mapped(run.frequency), slotAt: run.slotAt,
            status: mapped(run.status), attempts: run.attempts, maxAttempts: run.maxAttempts, nextAttemptAt: run.nextAttemptAt,
            itemCount: run.itemCount, lastError: run.lastError, sentAt: run.sentAt)
    }
}
