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
    /// Attempts that end while others are being recorded are recorded together.
    let completions: RequestBatcher<Completion, Bool>

    /// One ended attempt waiting to be recorded.
    struct Completion: Sendable {
        var claim: ClaimedDelivery
        var worker: String
        var startedAt: Date
        var record: DeliveryAttemptRecord
        var logger: Logger
    }

    public init(database: Database, organisation: UUID?, circuit: CircuitRule) {
        self.database = database
        self.organisation = organisation
        self.circuit = circuit
        completions = RequestBatcher(maximum: 256) { completions in
            await RequestBatcher.perOrganisation(completions, key: \.claim.organisationID) { organisation, completions in
                try await Self.record(completions, organisation: organisation, database: database, circuit: circuit)
            }
        }
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
        try await completions.submit(Completion(claim: claim, worker: worker, startedAt: startedAt, record: outcome, logger: logger))
    }

    /// Records the attempts of one organisation finishing together in one transaction: one
    /// fenced statement for all of them, then the endpoints' side effects of those recorded, in
    /// the order the attempts ended (a run of answers clears each breaker once).
    static func record(_ completions: [Completion], organisation: UUID, database: Database, circuit: CircuitRule) async throws -> [Bool] {
        try await database.withTenant(organisation) { tx in
            // (One queue's completions all carry its runner's name; grouping keeps the fence exact anyway.)
            var recorded = [Bool](repeating: false, count: completions.count)
            for (worker, mine) in Dictionary(grouping: completions.indices, by: { completions[$0].worker }) {
                let done = try await tx.completeDeliveries(
                    mine.map { (completions[$0].claim, completions[$0].startedAt, completions[$0].record.result) }, worker: worker)
                for (position, was) in zip(mine, done) { recorded[position] = was }
            }
            var answered: Set<UUID> = []
            for (completion, was) in zip(completions, recorded) where was {
                let outcome = completion.record
                if let endpoint = outcome.goneEndpoint {
                    try await tx.recordEndpointAnswers(answered)
                    answered = []
                    try await tx.disableEndpoint(endpoint, reason: "The receiver answered 410 Gone on \(Date().formatted(.iso8601)).")
                }
                guard let answer = outcome.endpointAnswered else { continue }
                if answer.answered {
                    answered.insert(answer.endpoint)
                    continue
                }
                try await tx.recordEndpointAnswers(answered)
                answered = []
                if try await tx.recordEndpointNoAnswer(
                    answer.endpoint, threshold: circuit.failures, cooldown: circuit.cooldown,
                    reason: "\(circuit.failures) attempts in a row got no answer; the last: \(outcome.result.error ?? "no answer")")
                {
                    completion.logger.warning("endpoint circuit opened", metadata: ["endpoint_id": .string(answer.endpoint.lowercased)])
                }
            }
            try await tx.recordEndpointAnswers(answered)
            return recorded
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
