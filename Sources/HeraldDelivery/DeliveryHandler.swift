import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics
import Synchronization

/// Sends one claimed delivery: reads it in its organisation, takes a send slot of its endpoint
/// (or gives it back while the endpoint is full or its circuit open), sends, and says how the
/// attempt ended. The runner records that through `OutboxQueue`.
public final class DeliveryHandler: WorkHandler, Sendable {
    let database: Database
    let sender: DeliverySender
    /// Sends in flight at once to one endpoint in this process (issue 8, item 13).
    let endpointConcurrency: Int
    /// How long a delivery given back for a full endpoint waits.
    let endpointBusyDelay: TimeInterval
    let circuitCooldown: TimeInterval
    let retry: RetryPolicy
    /// Sends in flight per endpoint.
    private let endpointSends = Mutex<[UUID: Int]>([:])
    /// Reads what the deliveries starting together need in one transaction per organisation.
    private let works: RequestBatcher<ClaimedDelivery, DeliveryWork?>

    public init(
        database: Database, sender: DeliverySender, endpointConcurrency: Int, endpointBusyDelay: TimeInterval,
        circuitCooldown: TimeInterval, retry: RetryPolicy
    ) {
        self.database = database
        self.sender = sender
        self.endpointConcurrency = endpointConcurrency
        self.endpointBusyDelay = endpointBusyDelay
        self.circuitCooldown = circuitCooldown
        self.retry = retry
        works = RequestBatcher(maximum: 256) { claims in
            await RequestBatcher.perOrganisation(claims, key: \.organisationID) { organisation, claims in
                let works = try await database.withTenant(organisation) { tx in try await tx.deliveryWorks(claims.map(\.deliveryID)) }
                return claims.map { works[$0.deliveryID] }
            }
        }
    }

    public func handle(_ claim: ClaimedDelivery, logger: Logger) async throws -> WorkDisposition<DeliveryAttemptRecord> {
        guard let work = try await works.submit(claim) else { throw StoreError.notFound("delivery") }
        var slot: UUID?
        if let endpoint = work.endpoint, endpoint.enabled {
            if let (until, why) = try await admit(endpoint, claim, now: Date()) {
                return .giveBack(until: until, reason: why)
            }
            slot = endpoint.id
        }
        // Left when the send ends, before the attempt is recorded: the slots bound the sends to
        // a receiver. A half-open circuit lets one trial through per cool-down whatever the
        // slots: taking it (takeCircuitTrial) moves the cool-down's end on in the database.
        defer { if let slot { leave(slot) } }
        let outcome = await sender.send(work, attempt: claim.attempt, logger: logger)
        if case .deferred(let why) = outcome {
            return .giveBack(until: Date().addingTimeInterval(endpointBusyDelay), reason: why)
        }
        let result = outcome.result(attempt: claim.attempt, maxAttempts: work.delivery.maxAttempts, policy: retry, now: Date())
        var record = DeliveryAttemptRecord(channel: work.delivery.channel, result: result)
        if case .gone = outcome, let endpoint = work.endpoint { record.goneEndpoint = endpoint.id }
        if let slot, let answered = outcome.receiverAnswered { record.endpointAnswered = (slot, answered) }
        return .done(record)
    }

    /// Counts and logs the attempt.
    public func finished(
        _ claim: ClaimedDelivery, disposition: WorkDisposition<DeliveryAttemptRecord>?, recorded: Bool?,
        duration: Duration, logger: Logger
    ) {
        guard case .done(let record)? = disposition, let recorded else { return }
        let result = record.result
        let outcome = (recorded ? result.outcome : .fenced).rawValue
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        Counter(label: "herald_delivery_attempts_total", dimensions: [("channel", record.channel.rawValue), ("outcome", outcome)])
            .increment()
        Timer(label: "herald_delivery_attempt_seconds", dimensions: [("channel", record.channel.rawValue)]).recordSeconds(seconds)
        logger.info(
            "delivery attempt",
            metadata: [
                "channel": .string(record.channel.rawValue), "outcome": .string(outcome),
                "duration_ms": "\(Int(seconds * 1000))", "response_code": "\(result.responseCode.map(String.init) ?? "-")",
                "error": .string(result.error ?? ""),
            ])
    }

    /// Takes a send slot of `endpoint`, or says until when to give the delivery back: while its
    /// circuit is open, while another worker runs the half-open trial, or while its slots are full.
    private func admit(_ endpoint: Endpoint, _ claim: ClaimedDelivery, now: Date) async throws -> (until: Date, why: String)? {
        let busy = now.addingTimeInterval(endpointBusyDelay + Double.random(in: 0..<1))
        let state = endpoint.circuit.state(at: now)
        if state == .open, let retryAt = endpoint.circuit.retryAt {
            return (retryAt, "circuit open")
        }
        let limit = endpointConcurrency
        let entered = endpointSends.withLock { sends in
            guard sends[endpoint.id, default: 0] < limit else { return false }
            sends[endpoint.id, default: 0] += 1
            return true
        }
        guard entered else { return (busy, "endpoint busy") }
        if state == .halfOpen {
            let trial: Bool
            do {
                trial = try await database.withTenant(claim.organisationID) { tx in
                    try await tx.takeCircuitTrial(endpoint.id, cooldown: circuitCooldown)
                }
            } catch {
                leave(endpoint.id)
                throw error
            }
            if !trial {
                leave(endpoint.id)
                return (busy, "circuit trial running")
            }
        }
        return nil
    }

    private func leave(_ endpoint: UUID) {
        endpointSends.withLock { sends in
            sends[endpoint, default: 1] -= 1
            if sends[endpoint] == 0 { sends[endpoint] = nil }
        }
    }
}
