import Crypto
import Foundation
import HeraldCore
import HeraldStore
import Logging
import OpenAPIRuntime

extension HeraldService {
    /// notify: validate, honour the idempotency key, plan, write everything in one transaction.
    func sendEvent(_ input: Operations.SendEvent.Input) async throws -> Operations.SendEvent.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let request = try eventRequest(body)
        let key = input.headers.idempotencyKey
        if let key, !(1...255).contains(key.utf8.count) {
            throw APIError.unprocessable(ValidationError(field: "Idempotency-Key", message: "must be 1 to 255 bytes."))
        }
        if let key, key.hasPrefix(Schedule.idempotencyPrefix) {
            // A schedule's occurrences are keyed so; a client's event under such a key would stand
            // in for the occurrence, which then would not be sent.
            throw APIError.unprocessable(
                ValidationError(
                    field: "Idempotency-Key", message: "must not begin with \"schedule:\" (the keys of schedules' occurrences)."))
        }
        let hash = try requestHash(body)
        let now = now()
        enum Outcome: Sendable { case created(EventRecord), replayed(EventRecord) }
        let outcome: Outcome = try await tenant { tx, _ in
            if let key, let first = try await firstAnswer(lock: key, hash: hash, tx, find: { try await tx.event(idempotencyKey: key) }) {
                return .replayed(first)
            }
            // Checked after the replay: retrying a stored request later still gets its first answer.
            try checkTimes(body)
            try await checkExclusions(request.audience, tx)
            let event = try await mappingEngineErrors {
                try await tx.send(request, now: now, idempotencyKey: key, requestHash: hash, fanout: fanout)
            }
            if case .user = tx.actor {
                // A person sending by hand is audited, as a CRM's `notification.send_manual` is;
                // the payload stays out of the audit log.
                try await tx.audit(
                    action: "event.send_manual", targetType: "event", targetID: event.id.lowercased, before: nil,
                    after: try auditValue(EventSendAudit(type: event.typeKey, audience: body.audience, counts: try convert(event.counts))))
            }
            return .created(event)
        }
        switch outcome {
        case .created(let event):
            EngineMetrics.accepted(.notify, counts: event.counts)
            return .accepted(.init(headers: .init(idempotentReplayed: nil), body: .json(try accepted(event))))
        case .replayed(let event):
            return .accepted(.init(headers: .init(idempotentReplayed: "true"), body: .json(try accepted(event))))
        }
    }

    /// The event already sent under `key` (nil without a key, or when none is), once the key's
    /// lock is taken: a second request with the same key while the first runs is a 409.
    func firstEvent(under key: String?, _ tx: TenantTransaction) async throws -> EventRecord? {
        guard let key else { return nil }
        try await lockIdempotencyKey(key, tx)
        return try await tx.event(idempotencyKey: key)
    }

    /// What the first request with an Idempotency-Key made (`find`, with its request's hash), to
    /// answer again; nil when none did. Under the key's lock (`lock`): a second request while the
    /// first runs is a 409, and one with another body (`hash`) a 422.
    func firstAnswer<Record: HasRequestHash>(
        lock: String, hash: String, _ tx: TenantTransaction, find: () async throws -> Record?
    ) async throws -> Record? {
        try await lockIdempotencyKey(lock, tx)
        guard let first = try await find() else { return nil }
        guard first.requestHash == hash else {
            throw APIError.unprocessable(ValidationError(field: "Idempotency-Key", message: "was already used with a different body."))
        }
        return first
    }

    private func lockIdempotencyKey(_ key: String, _ tx: TenantTransaction) async throws {
        guard try await tx.lockIdempotencyKey(key) else {
            throw APIError.conflict("A request with this Idempotency-Key is still being processed; retry later.")
        }
    }

    func dryRunEvent(_ input: Operations.DryRunEvent.Input) async throws -> Operations.DryRunEvent.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let request = try eventRequest(body)
        try checkTimes(body)
        let limit = try PageSize.clamp(input.query.limit)
        let after = try input.query.cursor.map { c in try PageCursor(encoded: c).id }
        let explanation = try await tenant { tx, _ in try await dryRun(request, tx, limit: limit, after: after) }
        return .ok(.init(body: .json(explanation)))
    }

    func listEvents(_ input: Operations.ListEvents.Input) async throws -> Operations.ListEvents.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let now = now()
        let page = try await tenant { tx, _ in
            var typeID: UUID?
            if let key = input.query._type {
                guard let type = try await tx.notificationType(key: key) else {
                    throw APIError.unknownType(key, field: "type")
                }
                typeID = type.id
            }
            let state = input.query.state.map { mapped($0, to: EventState.self) }
            let schedule = try input.query.scheduleId.map { v in try Validate.uuid(v, field: "schedule_id") }
            return try await tx.events(
                typeID: typeID, state: state, scheduleID: schedule, idempotencyKey: input.query.idempotencyKey, now: now, limit: limit,
                after: cursor)
        }
        return .ok(.init(body: .json(.init(items: try page.items.map { try .init($0, now: now) }, nextCursor: page.next?.encoded))))
    }

    func getEvent(_ input: Operations.GetEvent.Input) async throws -> Operations.GetEvent.Output {
        let id = try id(input.path.eventId, "event")
        let event = try await tenant { tx, _ in try await tx.event(id) }
        return .ok(.init(body: .json(try .init(event, now: now()))))
    }

    func cancelEvent(_ input: Operations.CancelEvent.Input) async throws -> Operations.CancelEvent.Output {
        let id = try id(input.path.eventId, "event")
        let now = now()
        let cancellation = try await tenant { tx, _ in
            guard let stopped = try await tx.cancelEvent(id, now: now) else {
                throw APIError.conflict("The event is already cancelled.")
            }
            try await tx.audit(
                action: "event.cancel", targetType: "event", targetID: id.lowercased, before: nil,
                after: try auditValue([
                    "deliveries": stopped.deliveries, "digest_items": stopped.digestItems, "notifications": stopped.notifications,
                ]))
            return stopped
        }
        return .ok(
            .init(
                body: .json(
                    .init(
                        eventId: id.lowercased, status: .cancelled, deliveriesCancelled: cancellation.deliveries,
                        digestItemsCancelled: cancellation.digestItems, notificationsWithdrawn: cancellation.notifications))))
    }

    func explainEvent(_ input: Operations.ExplainEvent.Input) async throws -> Operations.ExplainEvent.Output {
        let id = try id(input.path.eventId, "event")
        let limit = try PageSize.clamp(input.query.limit)
        let after = try input.query.cursor.map { c in try PageCursor(encoded: c).id }
        let user = try input.query.userId.map { v in try Validate.uuid(v, field: "user_id") }
        let explanation = try await tenant { tx, _ in
            let event = try await tx.event(id)
            // An unknown user is a 404 (as in the debug form and stats), not an empty explanation.
            return try await explanationOf(event, tx, user: try await knownUser(user, in: tx), limit: limit, after: after)
        }
        return .ok(.init(body: .json(explanation)))
    }

    /// The form admins ask for first: the latest event of a type explained, or a dry run to everyone.
    func debugNotifications(_ input: Operations.DebugNotifications.Input) async throws -> Operations.DebugNotifications.Output {
        let limit = try PageSize.clamp(input.query.limit)
        let after = try input.query.cursor.map { c in try PageCursor(encoded: c).id }
        let user = try input.query.userId.map { v in try Validate.uuid(v, field: "user_id") }
        let key = input.query.event
        let explanation = try await tenant { tx, _ in
            guard let type = try await tx.notificationType(key: key) else {
                throw APIError.unknownType(key, field: "event")
            }
            // An unknown user is a 404, as for stats, not an explanation with nobody in it.
            let known = try await knownUser(user, in: tx)
            if let latest = try await tx.latestEvent(typeID: type.id) {
                return try await explanationOf(latest, tx, user: known, limit: limit, after: after)
            }
            let audience = user.map { Audience(userIDs: [$0]) } ?? Audience(everyone: true)
            return try await dryRun(EventRequest(typeKey: key, audience: audience, payload: .object([:])), tx, limit: limit, after: after)
        }
        return .ok(.init(body: .json(explanation)))
    }

    // MARK: Shared

    /// A 422 naming the `exclude_user_ids` the organisation does not have, as unknown `user_ids` get.
    func checkExclusions(_ audience: Audience, _ tx: TenantTransaction) async throws {
        let unknown = try await tx.unknownExclusions(audience)
        guard !unknown.isEmpty else { return }
        throw APIError.unprocessable(
            ValidationError(
                field: "audience.exclude_user_ids",
                message:
                    "names what does not exist in your organisation: \(unknown.map { "user \($0.lowercased)" }.joined(separator: ", "))."))
    }

    /// Runs `body`, turning the engine's refusals (an unknown type or audience name) into 422s.
    func mappingEngineErrors<Result>(_ body: () async throws -> Result) async throws -> Result {
        do {
            return try await body()
        } catch let unknown as UnknownNotificationType {
            throw APIError.unknownType(unknown.key, field: "type")
        } catch let unknown as UnknownAudience {
            let names =
                unknown.userIDs.map { "user \($0.lowercased)" } + unknown.roleKeys.map { "role \($0)" }
                + unknown.groupKeys.map { "group \($0)" }
            throw APIError.unprocessable(
                ValidationError(
                    field: "audience", message: "names what does not exist in your organisation: \(names.joined(separator: ", "))."))
        }
    }

    /// The planner's decisions, a page of users at a time (by user id, like explain); the counts
    /// cover the whole audience, planned a fan-out chunk at a time (`planDryRun`).
    private func dryRun(
        _ request: EventRequest, _ tx: TenantTransaction, limit: Int, after: UUID? = nil
    ) async throws -> Components.Schemas.Explanation {
        try await checkExclusions(request.audience, tx)
        let planned = try await mappingEngineErrors {
            try await tx.planDryRun(request, now: now(), limit: limit, after: after, chunkSize: fanout.chunkSize)
        }
        let page = planned.traces
        let users = Dictionary(
            try await tx.users(ids: page.map(\.targeting.userID)).map { ($0.id, $0) },
            uniquingKeysWith: { a, _ in a })
        var items = try page.map { trace in try explained(ExplainedRecipient(planned: trace, user: users[trace.targeting.userID])) }
        // A digest decision shows when its digest would go, as explain shows it for an item made.
        let digestUsers = page.filter { $0.channels.contains { $0.decision.outcome == .digest } }.map(\.targeting.userID)
        if !digestUsers.isEmpty {
            let now = now()
            let due = try await tx.digestDueTimes(for: digestUsers, after: max(request.deliverAt ?? now, now))
            // `items` are `page`'s traces, in order.
            for (i, trace) in page.enumerated() {
                guard let times = due[trace.targeting.userID] else { continue }
                for c in items[i].channels.indices where items[i].channels[c].outcome == .digest {
                    items[i].channels[c].digestDueAt = items[i].channels[c].frequency == .weekly ? times.weekly : times.daily
                }
            }
        }
        let next =
            planned.more ? page.last.map { PageCursor(time: Date(timeIntervalSince1970: 0), id: $0.targeting.userID).encoded } : nil
        return .init(_type: request.typeKey, dryRun: true, counts: try convert(planned.counts), items: items, nextCursor: next)
    }

    /// The user an explanation is asked about; a 404 when there is no such user.
    private func knownUser(_ id: UUID?, in tx: TenantTransaction) async throws -> User? {
        guard let id else { return nil }
        return try await tx.user(id)
    }

    /// The event's trace, a page of it or `user`'s part. A user the trace does not hold gets an
    /// item that says why (`NOT_IN_AUDIENCE`, or `NOT_WRITTEN` while, or because, a chunked
    /// fan-out did not reach them), not an empty list.
    private func explanationOf(
        _ event: EventRecord, _ tx: TenantTransaction, user: User?, limit: Int, after: UUID?
    ) async throws -> Components.Schemas.Explanation {
        let (items, next) = try await tx.explain(eventID: event.id, userID: user?.id, limit: limit, after: after, now: now())
        var explainedItems = try items.map(explained)
        if let user, explainedItems.isEmpty, after == nil {
            explainedItems = [Self.untraced(user, fanout: event.fanout)]
        }
        return .init(
            eventId: event.id.lowercased, _type: event.typeKey, dryRun: false, counts: try convert(event.counts),
            items: explainedItems, nextCursor: next.map { PageCursor(time: Date(timeIntervalSince1970: 0), id: $0).encoded })
    }

    /// A user the event's trace does not hold: outside its audience, or not written (yet) by a
    /// chunked fan-out that is still running, was cancelled or failed.
    static func untraced(_ user: User, fanout: FanoutProgress?) -> Components.Schemas.ExplainedUser {
        let (reason, text): (String, String) =
            switch fanout?.state {
            case .expanding?:
                ("NOT_WRITTEN", "The event's recipients are still being written, in chunks; this user's decision is not written yet.")
            case .cancelled?, .failed?:
                (
                    "NOT_WRITTEN",
                    "The event's fan-out stopped (cancelled or failed) before this user's decision was written, if the audience reached them."
                )
            default:
                (
                    "NOT_IN_AUDIENCE",
                    "The event's audience did not reach this user when it was sent: not named, in none of its roles or groups, and not sent to everyone (or the user did not exist yet)."
                )
            }
        return .init(
            userId: user.id.lowercased, email: user.email, displayName: user.displayName, targeted: false, rule: "none", reason: reason,
            reasonText: text, channels: [])
    }

    private func explained(_ recipient: ExplainedRecipient) throws -> Components.Schemas.ExplainedUser {
        .init(
            userId: recipient.userID.lowercased, email: recipient.email, displayName: recipient.displayName, targeted: recipient.targeted,
            rule: recipient.rule, reason: recipient.reason.rawValue, reasonText: recipient.reason.sentence,
            channels: try recipient.channels.map { channel in try explained(channel, of: recipient) })
    }

    private func explained(_ channel: TraceChannelRecord, of recipient: ExplainedRecipient) throws -> Components.Schemas.ExplainedChannel {
        let digest = channel.digestItemID.flatMap { recipient.digests[$0] }
        let run: Components.Schemas.ExplainedChannel.DigestRunPayload? = digest?.run.map { run in
            .init(
                id: run.id.lowercased, status: mapped(run.status), slotAt: run.slotAt,
                attempts: run.attempts, sentAt: run.sentAt, lastError: run.lastError)
        }
        let deliveries: [Components.Schemas.ExplainedChannel.DeliveriesPayloadPayload]? =
            channel.deliveryIDs.isEmpty
            ? nil
            // A delivery the trace names but retention has since deleted is left out.
            : channel.deliveryIDs.compactMap { id in
                recipient.deliveryStatus[id].map { .init(id: id.lowercased, status: mapped($0)) }
            }
        return .init(
            channel: mapped(channel.channel), enabled: channel.enabled,
            frequency: mapped(channel.frequency), conditions: try convert(channel.conditions),
            source: mapped(channel.source), outcome: mapped(channel.outcome),
            reason: channel.reason.rawValue, reasonText: channel.reasonText,
            failedCondition: channel.failedCondition,
            notificationId: channel.notificationID?.lowercased,
            notificationStatus: channel.notificationID.flatMap { recipient.notificationStatus[$0] }.map { mapped($0) },
            deliveryId: channel.deliveryID?.lowercased,
            deliveryStatus: channel.deliveryID.flatMap { recipient.deliveryStatus[$0]?.rawValue },
            deliveryDueAt: channel.deliveryID.flatMap { recipient.deliveryDue[$0] },
            deliveries: deliveries,
            digestItemId: channel.digestItemID?.lowercased,
            digestStatus: digest.map { mapped($0.status) },
            digestDueAt: digest?.dueAt,
            digestDroppedReason: digest?.droppedReason.map { mapped($0) },
            digestRun: run)
    }

    /// Validates the body of notify (and of a dry run) into an engine request.
    func eventRequest(_ body: Components.Schemas.EventCreate) throws -> EventRequest {
        let audience = Audience(
            userIDs: try (body.audience.userIds ?? []).map { v throws(ValidationError) in try Validate.uuid(v, field: "audience.user_ids")
            },
            roleKeys: body.audience.roles ?? [], groupKeys: body.audience.groups ?? [], everyone: body.audience.everyone ?? false,
            excludeUserIDs: try (body.audience.excludeUserIds ?? []).map { v throws(ValidationError) in
                try Validate.uuid(v, field: "audience.exclude_user_ids")
            })
        guard !audience.isEmpty else {
            throw APIError.unprocessable(
                ValidationError(field: "audience", message: "names nobody: give user_ids, roles, groups or everyone."))
        }
        if let deliverAt = body.deliverAt, let expiresAt = body.expiresAt, expiresAt <= deliverAt {
            throw APIError.unprocessable(ValidationError(field: "expires_at", message: "must be after deliver_at."))
        }
        let url = try body.url.map { url in try Validate.linkURL(url, field: "url") }
        let tags = Array(Set(try (body.tags ?? []).map { v throws(ValidationError) in try Validate.tag(v) })).sorted()
        return EventRequest(
            typeKey: body._type, audience: audience, payload: try convert(body.payload ?? .init()),
            sourceActor: try body.actor.map { try convert($0) }, subjectType: body.subject?._type, subjectID: body.subject?.id,
            severity: body.severity.map { mapped($0, to: Severity.self) }, priority: body.priority.map { mapped($0, to: Priority.self) },
            deliverAt: body.deliverAt, expiresAt: body.expiresAt, url: url, tags: tags)
    }

    /// How far ahead `deliver_at` may be: 366 days.
    static let longestNotice: TimeInterval = 366 * 86_400

    /// Checks that depend on the time of the request (not part of what a replay compares).
    private func checkTimes(_ body: Components.Schemas.EventCreate) throws {
        let now = now()
        if let expiresAt = body.expiresAt, expiresAt <= now {
            throw APIError.unprocessable(ValidationError(field: "expires_at", message: "must be in the future."))
        }
        // A year is the longest notice a notification gives; a later instant is a mistake (a year
        // typed wrong, milliseconds read as seconds) that would sit unseen in the outbox.
        if let deliverAt = body.deliverAt, deliverAt > now.addingTimeInterval(Self.longestNotice) {
            throw APIError.unprocessable(
                ValidationError(field: "deliver_at", message: "must be at most 366 days from now; for a later reminder, use a schedule."))
        }
    }

    /// SHA-256 of the body with sorted keys: the same request twice hashes the same.
    func requestHash(_ body: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .millisecondsSince1970
        return SHA256.hash(data: try encoder.encode(body)).map { String(format: "%02x", $0) }.joined()
    }

    func accepted(_ event: EventRecord) throws -> Components.Schemas.EventAccepted {
        // Rebuilt from the stored event: a replay after a cancellation says CANCELLED (api.md), so
        // a client that retries does not believe the notification is still going out.
        .init(
            eventId: event.id.lowercased, status: event.status == .cancelled ? .cancelled : .accepted, deliverAt: event.deliverAt,
            counts: try convert(event.counts), fanout: event.fanout.map(Components.Schemas.Fanout.init))
    }
}

extension Components.Schemas.AudienceSpec {
    init(_ audience: Audience) {
        self.init(
            userIds: audience.userIDs.isEmpty ? nil : audience.userIDs.map(\.lowercased),
            roles: audience.roleKeys.isEmpty ? nil : audience.roleKeys,
            groups: audience.groupKeys.isEmpty ? nil : audience.groupKeys, everyone: audience.everyone ? true : nil,
            excludeUserIds: audience.excludeUserIDs.isEmpty ? nil : audience.excludeUserIDs.map(\.lowercased))
    }
}

extension Components.Schemas.Event {
    init(_ e: EventRecord, now: Date) throws {
        let audience = e.audience
        self.init(
            id: e.id.lowercased, _type: e.typeKey, status: mapped(e.status),
            state: mapped(e.state(at: now)),
            audience: .init(audience),
            payload: try convert(e.payload),
            subject: e.subjectType.map { .init(_type: $0, id: e.subjectID ?? "") },
            severity: mapped(e.severity), priority: mapped(e.priority),
            deliverAt: e.deliverAt, expiresAt: e.expiresAt, counts: try convert(e.counts), createdAt: e.createdAt,
            cancelledAt: e.cancelledAt,
            sentBy: .init(_type: mapped(e.actorType), id: e.actorID?.lowercased), tags: e.tags.isEmpty ? nil : e.tags,
            fanout: e.fanout.map(Components.Schemas.Fanout.init), scheduleId: e.scheduleID?.lowercased, url: e.url,
            actor: try e.sourceActor.map { try convert($0) })
    }
}

extension Components.Schemas.Fanout {
    init(_ progress: FanoutProgress) {
        self.init(
            state: mapped(progress.state), done: progress.done, expected: progress.expected, finishedAt: progress.finishedAt,
            error: progress.error)
    }
}

/// What the audit log keeps of a manual send: the type, the audience and what the engine did.
private struct EventSendAudit: Encodable {
    var type: String
    var audience: Components.Schemas.AudienceSpec
    var counts: Components.Schemas.DecisionCounts
}

extension TraceChannelRecord {
    /// The reason in words; a condition not met is named, with its place among the preference's.
    var reasonText: String {
        guard reason == .conditionNotMet, let failed = failedCondition, conditions.indices.contains(failed) else { return reason.sentence }
        let place = conditions.count == 1 ? "The condition" : "Condition \(failed + 1) of \(conditions.count)"
        return "\(place) of the preference, \(conditions[failed].summary), is not met by the event or its recipient."
    }
}
