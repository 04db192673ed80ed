import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listDeliveries(_ input: Operations.ListDeliveries.Input) async throws -> Operations.ListDeliveries.Output {
        let q = input.query
        let (limit, cursor) = try page(q.limit, q.cursor)
        let filter = DeliveryFilter(
            status: q.status.map { mapped($0, to: DeliveryStatus.self) },
            channel: q.channel.map { mapped($0, to: NotificationChannel.self) },
            userID: try q.userId.map { v throws(ValidationError) in try Validate.uuid(v, field: "user_id") },
            eventID: try q.eventId.map { v throws(ValidationError) in try Validate.uuid(v, field: "event_id") },
            endpointID: try q.endpointId.map { v throws(ValidationError) in try Validate.uuid(v, field: "endpoint_id") }, since: q.since)
        let page = try await tenant { tx, _ in try await tx.deliveries(filter, limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: try page.items.map { try .init($0, attempts: nil) }, nextCursor: page.next?.encoded))))
    }

    func getDeliveryStats(_ input: Operations.GetDeliveryStats.Input) async throws -> Operations.GetDeliveryStats.Output {
        let now = now()
        let stats = try await tenant { tx, _ in try await tx.outboxStats(now: now) }
        return .ok(
            .init(
                body: .json(
                    .init(
                        byStatus: .init(additionalProperties: stats.byStatus), byChannel: .init(additionalProperties: stats.byChannel),
                        oldestPendingAgeSeconds: stats.oldestPendingAge))))
    }

    func getDelivery(_ input: Operations.GetDelivery.Input) async throws -> Operations.GetDelivery.Output {
        let id = try id(input.path.deliveryId, "delivery")
        let delivery = try await tenant { tx, _ in
            try Components.Schemas.Delivery(try await tx.delivery(id), attempts: try await tx.deliveryAttempts(id))
        }
        return .ok(.init(body: .json(delivery)))
    }

    func retryDelivery(_ input: Operations.RetryDelivery.Input) async throws -> Operations.RetryDelivery.Output {
        let id = try id(input.path.deliveryId, "delivery")
        let delivery = try await tenant { tx, _ in
            let before = try await tx.delivery(id)
            guard let after = try await tx.retryDelivery(id) else {
                // The one rule that refused it, named, from the row as it is now (a DEAD row of a
                // cancelled event was told "this one is DEAD", a state that may be retried: a trial).
                let now = try await tx.delivery(id)
                let why =
                    if !TenantTransaction.retryableStatuses.contains(now.status) {
                        "Only a FAILED, DEAD or CANCELLED delivery can be retried; this one is \(now.status.rawValue)."
                    } else if now.attempts >= TenantTransaction.mostAttempts {
                        "This delivery has used \(now.attempts) attempts, the most a delivery may have (\(TenantTransaction.mostAttempts))."
                    } else {
                        "This delivery's event was cancelled; a delivery of a cancelled event cannot be retried."
                    }
                throw APIError.conflict(why)
            }
            try await tx.audit(
                action: "delivery.retry", targetType: "delivery", targetID: id.lowercased,
                before: try auditValue(["status": before.status]), after: try auditValue(["status": after.status]))
            return try Components.Schemas.Delivery(after, attempts: try await tx.deliveryAttempts(id))
        }
        return .ok(.init(body: .json(delivery)))
    }

    /// Every delivery a filter matches, back in the queue (a trial retried 3 000 DEAD webhooks
    /// one call each after an outage: 14.2 s).
    func retryDeliveries(_ input: Operations.RetryDeliveries.Input) async throws -> Operations.RetryDeliveries.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let status = body.status.map { mapped($0, to: DeliveryStatus.self) } ?? .dead
        let filter = DeliveryFilter(
            status: status,
            channel: body.channel.map { mapped($0, to: NotificationChannel.self) },
            userID: try body.userId.map { v throws(ValidationError) in try Validate.uuid(v, field: "user_id") },
            eventID: try body.eventId.map { v throws(ValidationError) in try Validate.uuid(v, field: "event_id") },
            endpointID: try body.endpointId.map { v throws(ValidationError) in try Validate.uuid(v, field: "endpoint_id") },
            since: body.since, until: body.until)
        try Validate.window(since: body.since, until: body.until)
        let limit = body.limit ?? 1_000
        guard (1...10_000).contains(limit) else {
            throw APIError.unprocessable(ValidationError(field: "limit", message: "must be between 1 and 10000."))
        }
        let (retried, more, skipped) = try await tenant { tx, _ in
            let result = try await tx.retryDeliveries(filter, limit: limit)
            if result.retried > 0 {
                try await tx.audit(
                    action: "delivery.retry_many", targetType: "organisation", targetID: tx.organisationID.lowercased, before: nil,
                    after: try auditValue(
                        [
                            "retried": .number(Double(result.retried)), "status": .string(status.rawValue),
                            "filter": try auditValue(body),
                        ] as [String: JSONValue]))
            }
            return result
        }
        return .ok(.init(body: .json(.init(retried: retried, more: more, skipped: skipped))))
    }

    func cancelDelivery(_ input: Operations.CancelDelivery.Input) async throws -> Operations.CancelDelivery.Output {
        let id = try id(input.path.deliveryId, "delivery")
        let delivery = try await tenant { tx, _ in
            let before = try await tx.delivery(id)
            guard let after = try await tx.cancelDelivery(id) else {
                throw APIError.conflict("Only a PENDING or FAILED delivery can be cancelled; this one is \(before.status.rawValue).")
            }
            try await tx.audit(
                action: "delivery.cancel", targetType: "delivery", targetID: id.lowercased,
                before: try auditValue(["status": before.status]), after: try auditValue(["status": after.status]))
            return try Components.Schemas.Delivery(after, attempts: try await tx.deliveryAttempts(id))
        }
        return .ok(.init(body: .json(delivery)))
    }
}

extension Components.Schemas.Delivery {
    init(_ d: Delivery, attempts: [DeliveryAttempt]?) throws {
        self.init(
            id: d.id.lowercased, eventId: d.eventID.lowercased, userId: d.userID.lowercased, channel: try mapped(d.channel),
            destination: d.destination, status: mapped(d.status), attempts: d.attempts, maxAttempts: d.maxAttempts,
            nextAttemptAt: d.nextAttemptAt, lastError: d.lastError, lastResponseCode: d.lastResponseCode, lastResponse: d.lastResponse,
            endpointId: d.endpointID?.lowercased, sentAt: d.sentAt,
            createdAt: d.createdAt, updatedAt: d.updatedAt,
            attemptLog: attempts?.map {
                .init(
                    attempt: $0.attempt, worker: $0.worker, startedAt: $0.startedAt, finishedAt: $0.finishedAt,
                    outcome: mapped($0.outcome), responseCode: $0.responseCode, error: $0.error)
            })
    }
}
