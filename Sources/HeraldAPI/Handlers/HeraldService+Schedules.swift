import Foundation
import HeraldCore
import HeraldStore

// Recurring schedules (issue 11): an event sent on an RRULE in a time zone; `herald serve`
// sends each occurrence once (ScheduleQueue in HeraldDelivery).
extension HeraldService {
    func listSchedules(_ input: Operations.ListSchedules.Input) async throws -> Operations.ListSchedules.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in try await tx.schedules(limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.Schedule.init), nextCursor: page.next?.encoded))))
    }

    func getSchedule(_ input: Operations.GetSchedule.Input) async throws -> Operations.GetSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        let schedule = try await tenant { tx, _ in try await tx.schedule(id) }
        return .ok(.init(body: .json(try .init(schedule))))
    }

    func createSchedule(_ input: Operations.CreateSchedule.Input) async throws -> Operations.CreateSchedule.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let name = try Validate.text(body.name, field: "name")
        let request = try scheduledEventRequest(body.event)
        let zoneName = try body.timeZone.map { v in try Validate.timezone(v, field: "time_zone") }
        let key = input.headers.idempotencyKey
        if let key, !(1...255).contains(key.utf8.count) {
            throw APIError.unprocessable(ValidationError(field: "Idempotency-Key", message: "must be 1 to 255 bytes."))
        }
        let hash = try requestHash(body)
        let now = now()
        let id = UUID()
        enum Outcome: Sendable { case created(Schedule), replayed(Schedule) }
        let outcome: Outcome = try await tenant { tx, _ in
            // A retried create answers the schedule the first one made: never two schedules
            // sending every occurrence twice. Locked apart from events' keys: theirs may not begin
            // with `schedule:`, and occurrences' go on with a schedule's id, not `create`.
            if let key,
                let first = try await firstAnswer(
                    lock: "\(Schedule.idempotencyPrefix)create:\(key)", hash: hash, tx, find: { try await tx.schedule(idempotencyKey: key) }
                )
            {
                return .replayed(first.schedule)
            }
            // Checked after the replay: retrying a stored request later still gets its first answer.
            let startsAt = try checkedStart(body.startsAt ?? now, now: now)
            var zone = zoneName ?? ""
            if zoneName == nil { zone = try await tx.organisation().defaultTimezone }
            // The type and the audience's names are checked as notify checks them (nothing is read
            // of the audience's users: planning it held every user in memory), its groups and
            // roles locked first so that none is deleted before this commits.
            try await tx.lockAudienceNames(request.audience)
            _ = try await inEvent { try await mappingEngineErrors { try await tx.checkEventRequest(request) } }
            try await inEvent { try await checkExclusions(request.audience, tx) }
            let first = try firstOccurrence(rule: body.rule, timeZone: zone, startsAt: startsAt, now: now)
            let schedule = try await tx.createSchedule(
                id: id, name: name, event: request, rule: body.rule, timeZone: zone, startsAt: startsAt, nextAt: first,
                idempotencyKey: key, requestHash: key == nil ? nil : hash)
            try await tx.audit(
                action: "schedule.create", targetType: "schedule", targetID: id.lowercased, before: nil,
                after: try scheduleAudit(schedule))
            return .created(schedule)
        }
        switch outcome {
        case .created(let schedule):
            return .created(.init(headers: .init(idempotentReplayed: nil), body: .json(try .init(schedule))))
        case .replayed(let schedule):
            return .created(.init(headers: .init(idempotentReplayed: "true"), body: .json(try .init(schedule))))
        }
    }

    func updateSchedule(_ input: Operations.UpdateSchedule.Input) async throws -> Operations.UpdateSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { v throws(ValidationError) in try Validate.text(v, field: "name") }
        let request = try body.event.map(scheduledEventRequest)
        let zoneName = try body.timeZone.map { v in try Validate.timezone(v, field: "time_zone") }
        let now = now()
        var newStart: Date?
        if let startsAt = body.startsAt { newStart = try checkedStart(startsAt, now: now) }
        let schedule = try await tenant { tx, _ in
            let current = try await tx.schedule(id, locking: true)
            // The event is checked even when unchanged: a group it names may have gone since an
            // old schedule finished, and a new rule would bring it back to fail.
            let event = request ?? current.event
            try await tx.lockAudienceNames(event.audience)
            _ = try await inEvent { try await mappingEngineErrors { try await tx.checkEventRequest(event) } }
            // Exclusions only when the event is new: one deleted since excludes nobody either way.
            if let request { try await inEvent { try await checkExclusions(request.audience, tx) } }
            let rule = body.rule ?? current.rule
            let zone = zoneName ?? current.timeZone
            let startsAt = newStart ?? current.startsAt
            // A new rhythm starts from now: its first occurrence after now (what the old rule had
            // due is not sent). The same rhythm (a client sending back what it read) keeps its next
            // occurrence and its lease.
            var next = current.nextAt
            let rhythmChanged = rule != current.rule || zone != current.timeZone || startsAt != current.startsAt
            if rhythmChanged { next = try firstOccurrence(rule: rule, timeZone: zone, startsAt: startsAt, now: now) }
            let updated = try await tx.updateSchedule(
                id, name: name ?? current.name, event: event, rule: rule, timeZone: zone, startsAt: startsAt,
                nextAt: next, releasingLease: rhythmChanged)
            try await tx.audit(
                action: "schedule.update", targetType: "schedule", targetID: id.lowercased,
                before: try scheduleAudit(current), after: try scheduleAudit(updated))
            return updated
        }
        return .ok(.init(body: .json(try .init(schedule))))
    }

    /// A scheduled event as an engine request, validated as notify validates its body (a scheduled
    /// event is an event body without its times).
    private func scheduledEventRequest(_ event: Components.Schemas.ScheduledEvent) throws -> EventRequest {
        var body = event
        let expiresAfter = body.expiresAfterSeconds
        body.expiresAfterSeconds = nil // not a field of notify's body
        var request: EventRequest
        do {
            request = try eventRequest(try JSONDecoder().decode(Components.Schemas.EventCreate.self, from: JSONEncoder().encode(body)))
        } catch { throw Self.inEvent(error) }
        if let expiresAfter {
            guard (60...Int(Self.longestNotice)).contains(expiresAfter) else {
                throw APIError.unprocessable(
                    ValidationError(field: "event.expires_after_seconds", message: "must be 60 (a minute) to 31622400 (366 days)."))
            }
            request.expiresAfter = TimeInterval(expiresAfter)
        }
        return request
    }

    /// Runs `body`, naming the fields of its 422s as fields of the schedule's `event`
    /// (`event.type`, not `type`).
    private func inEvent<Result>(_ body: () async throws -> Result) async throws -> Result {
        do { return try await body() } catch let error { throw Self.inEvent(error) }
    }

    private static func inEvent(_ error: any Error) -> any Error {
        switch error {
        case APIError.unprocessable(let invalid):
            APIError.unprocessable(ValidationError(field: "event.\(invalid.field)", message: invalid.message))
        case let invalid as ValidationError: ValidationError(field: "event.\(invalid.field)", message: invalid.message)
        default: error
        }
    }

    /// Occurrences are counted from the start: a start far in the past would make every
    /// computation walk centuries of days.
    private func checkedStart(_ startsAt: Date, now: Date) throws -> Date {
        guard startsAt >= now.addingTimeInterval(-30 * 86_400), startsAt <= now.addingTimeInterval(3650 * 86_400) else {
            throw APIError.unprocessable(
                ValidationError(field: "starts_at", message: "must be at most 30 days before now and at most 10 years after."))
        }
        return startsAt
    }

    /// The first occurrence of `rule` from now on (and from its start); a 422 naming `rule` when
    /// it is not a rule Herald takes, or when its UNTIL or COUNT ended before now (a schedule
    /// that would never send).
    private func firstOccurrence(rule: String, timeZone zone: String, startsAt: Date, now: Date) throws -> Date {
        let recurrence: Recurrence
        do {
            recurrence = try Recurrence(rule: rule, start: startsAt, timeZone: TimeZone(identifier: zone) ?? .gmt)
        } catch {
            throw APIError.unprocessable(ValidationError(field: "rule", message: error.description))
        }
        guard let first = recurrence.occurrences(after: max(now, startsAt.addingTimeInterval(-1)), limit: 1).first else {
            throw APIError.unprocessable(
                ValidationError(
                    field: "rule",
                    message:
                        "has no occurrence from now on (its UNTIL or COUNT ends before, or no date matches it, such as a 30th in a rule of February only): nothing would be sent."
                ))
        }
        return first
    }

    func deleteSchedule(_ input: Operations.DeleteSchedule.Input) async throws -> Operations.DeleteSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        try await tenant { tx, _ in
            let before = try await tx.schedule(id)
            try await tx.deleteSchedule(id)
            try await tx.audit(
                action: "schedule.delete", targetType: "schedule", targetID: id.lowercased,
                before: try scheduleAudit(before), after: nil)
        }
        return .noContent(.init())
    }

    func pauseSchedule(_ input: Operations.PauseSchedule.Input) async throws -> Operations.PauseSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        let schedule = try await tenant { tx, _ in
            let current = try await tx.schedule(id, locking: true)
            // Paused already, or finished (no occurrence left): nothing changes, nothing is audited.
            guard !current.paused, current.nextAt != nil else { return current }
            let paused = try await tx.setSchedulePaused(id, paused: true, resumeAt: nil)
            try await tx.audit(
                action: "schedule.pause", targetType: "schedule", targetID: id.lowercased,
                before: try scheduleAudit(current), after: try scheduleAudit(paused))
            return paused
        }
        return .ok(.init(body: .json(try .init(schedule))))
    }

    /// The schedule's event now, once, outside its rhythm: keyed `schedule:<id>:run:<key>` (the
    /// client's Idempotency-Key, else a fresh one), so it names the schedule and a retry with the
    /// same key sends nothing twice.
    func runSchedule(_ input: Operations.RunSchedule.Input) async throws -> Operations.RunSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        if let key = input.headers.idempotencyKey, !(1...200).contains(key.utf8.count) {
            throw APIError.unprocessable(ValidationError(field: "Idempotency-Key", message: "must be 1 to 200 bytes."))
        }
        let key = "\(Schedule.idempotencyPrefix)\(id.lowercased):run:\(input.headers.idempotencyKey ?? UUID().uuidString.lowercased())"
        let now = now()
        let (event, replayed): (EventRecord, Bool) = try await tenant { tx, _ in
            let schedule = try await tx.schedule(id)
            if let first = try await firstEvent(under: key, tx) { return (first, true) }
            var request = schedule.event
            request.deliverAt = nil
            request.expiring(from: now)
            try await tx.lockAudienceNames(request.audience)
            let event = try await inEvent {
                try await mappingEngineErrors { try await tx.send(request, now: now, idempotencyKey: key, fanout: fanout) }
            }
            try await tx.audit(
                action: "schedule.run", targetType: "schedule", targetID: id.lowercased, before: nil,
                after: .object(["event_id": .string(event.id.lowercased)]))
            return (event, false)
        }
        if !replayed { EngineMetrics.accepted(.schedule, counts: event.counts) }
        return .accepted(.init(headers: .init(idempotentReplayed: replayed ? "true" : nil), body: .json(try accepted(event))))
    }

    func resumeSchedule(_ input: Operations.ResumeSchedule.Input) async throws -> Operations.ResumeSchedule.Output {
        let id = try id(input.path.scheduleId, "schedule")
        let now = now()
        let schedule = try await tenant { tx, _ in
            let current = try await tx.schedule(id, locking: true)
            // Not paused: nothing changes, nothing is audited.
            guard current.paused else { return current }
            let next = try current.recurrence().occurrences(after: now, limit: 1).first
            let resumed = try await tx.setSchedulePaused(id, paused: false, resumeAt: next)
            try await tx.audit(
                action: "schedule.resume", targetType: "schedule", targetID: id.lowercased,
                before: try scheduleAudit(current), after: try scheduleAudit(resumed))
            return resumed
        }
        return .ok(.init(body: .json(try .init(schedule))))
    }
}

/// A schedule as the audit log keeps it: as the API shows it, without its event's payload (the
/// audit log is kept for good; `event.send_manual` leaves the payload out too).
private func scheduleAudit(_ schedule: Schedule) throws -> JSONValue {
    guard case .object(var shown) = try auditValue(Components.Schemas.Schedule(schedule)) else { return .null }
    shown["payload"] = nil
    return .object(shown)
}

extension Components.Schemas.Schedule {
    init(_ schedule: Schedule) throws {
        let state: StatePayload = schedule.nextAt == nil ? .finished : schedule.paused ? .paused : .active
        var next: [Date] = []
        if state == .active, let first = schedule.nextAt {
            next = [first] + (try schedule.recurrence().occurrences(after: first, limit: 4))
        }
        self.init(
            id: schedule.id.lowercased, name: schedule.name, _type: schedule.typeKey, audience: .init(schedule.event.audience),
            payload: try convert(schedule.event.payload), event: try .init(schedule.event, typeKey: schedule.typeKey), rule: schedule.rule,
            timeZone: schedule.timeZone, startsAt: schedule.startsAt,
            state: state, nextOccurrences: next, sent: schedule.sent, skipped: schedule.skipped, lastOccurrenceAt: schedule.lastAt,
            lastEventId: schedule.lastEventID?.lowercased, lastError: schedule.lastError, createdAt: schedule.createdAt)
    }
}

extension Components.Schemas.ScheduledEvent {
    /// What each occurrence sends, whole, as `POST` and `PATCH /v1/schedules` take it.
    init(_ event: EventRequest, typeKey: String) throws {
        self.init(
            _type: typeKey, actor: try event.sourceActor.map { try convert($0) }, audience: .init(event.audience),
            payload: try convert(event.payload), subject: event.subjectType.map { .init(_type: $0, id: event.subjectID ?? "") },
            severity: event.severity.map { mapped($0) }, priority: event.priority.map { mapped($0) }, url: event.url,
            tags: event.tags.isEmpty ? nil : event.tags, expiresAfterSeconds: event.expiresAfter.map { Int($0) })
    }
}
