import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics

extension ClaimedDelivery: WorkClaim {
    public var logMetadata: Logger.Metadata {
        ["organisation_id": .string(organisationID.lowercased), "delivery_id": .string(deliveryID.lowercased), "attempt": "\(attempt)"]
    }
}

/// How one delivery attempt ended, as the outbox records it with the attempt's side effects on
/// its endpoint, all in one tenant transaction.
public struct DeliveryAttemptRecord: Sendable {
    /// The delivery's channel (metric label).
    public var channel: NotificationChannel
    public var result: AttemptResult
    /// The receiver answered 410 Gone: the endpoint is disabled.
    public var goneEndpoint: UUID?
    /// Whether the endpoint answered at all, when the attempt held one of its send slots: what
    /// the circuit breaker counts.
    public var endpointAnswered: (endpoint: UUID, answered: Bool)?
}

/// The circuit breaker's rule: this many attempts in a row without an answer pause an endpoint
/// for `cooldown` seconds.
public struct CircuitRule: Sendable {
    public var failures: Int
    public var cooldown: TimeInterval
}

/// The delivery outbox as a `WorkQueue`: the first kind of work on the runner.
///
/// Claims go through `claim_deliveries` (SECURITY DEFINER, `FOR UPDATE SKIP LOCKED`), which
/// rescues expired leases itself in the same statement, before claiming; everything else runs
/// in the delivery's organisation.
public struct OutboxQueue: WorkQueue {
    let database: Database
    /// Confines the queue to one organisation (tests); nil serves every organisation.
    let organisation: UUID?
    let circuit: CircuitRule

    public init(database: Database, organisation: UUID?, circuit: CircuitRule) {
        self.database = database
        self.organisation = organisation
        self.circuit = circuit
    }

    public var kind: String { "delivery" }

    /// A committed event may have written deliveries.
    public func wakes(on message: BusMessage) -> Bool {
        guard case .eventCommitted(let organisationID, _) = message else { return false }
        return organisation.map { $0 == organisationID } ?? true
    }

    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedDelivery] {
        try await database.claimDeliveries(worker: worker, limit: limit, leaseSeconds: leaseSeconds, organisation: organisation)
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedDelivery], leaseSeconds: Int) async throws {
        try await database.withTenant(organisation) { tx in
            try await tx.extendLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    public func complete(
        _ claim: ClaimedDelivery, worker: String, startedAt: Date, outcome: DeliveryAttemptRecord, logger: Logger
    ) async throws -> Bool {
        let result = outcome.result
        return try await database.withTenant(claim.organisationID) { tx in
            let completed = try await tx.completeDelivery(claim, worker: worker, startedAt: startedAt, result: result)
            guard completed else { return false }
            if let endpoint = outcome.goneEndpoint {
                try await tx.disableEndpoint(endpoint, reason: "The receiver answered 410 Gone on \(Date().formatted(.iso8601)).")
            }
            if let answer = outcome.endpointAnswered {
                if answer.answered {
                    try await tx.recordEndpointAnswer(answer.endpoint)
                } else if try await tx.recordEndpointNoAnswer(
                    answer.endpoint, threshold: circuit.failures, cooldown: circuit.cooldown,
                    reason: "\(circuit.failures) attempts in a row got no answer; the last: \(result.error ?? "no answer")")
                {
                    logger.warning("endpoint circuit opened", metadata: ["endpoint_id": .string(answer.endpoint.lowercased)])
                }
            }
            return true
        }
    }

    public func release(_ claim: ClaimedDelivery, worker: String, until: Date, reason: String) async throws -> Bool {
        let released = try await database.withTenant(claim.organisationID) { tx in
            try await tx.releaseDelivery(claim, worker: worker, until: until)
        }
        Counter(label: "herald_delivery_released_total", dimensions: [("reason", reason)]).increment()
        return released
    }

    /// Nothing: the lease expires, and the next claim rescues the row and logs the attempt as
    /// EXPIRED (counted, so a delivery that always fails this way ends DEAD).
    public func fail(_ claim: ClaimedDelivery, worker: String, error: any Error) async throws {}

    /// Nothing to do apart: `claim_deliveries` rescues expired leases before each claim.
    public func rescueExpired() async throws -> Int { 0 }
}
