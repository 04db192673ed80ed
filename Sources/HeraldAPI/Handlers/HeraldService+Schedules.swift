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
        // The same validation as notify's: the scheduled event is an event body without its times.
        let event = try JSONDecoder().decode(Components.Schemas.EventCreate.self, from: JSONEncoder().encode(body.event))
        let request = try eventRequest(event)
        let zoneName = try body.timeZone.map { v in try Validate.timezone(v, field: "time_zone") }
        let now = now()
        let startsAt = body.startsAt ?? now
        // Occurrences are counted from the start: a start far in the past would make every
        // computation walk centuries of days.
        guard startsAt >= now.addingTimeInterval(-30 * 86_400), startsAt <= now.addingTimeInterval(3650 * 86_400) else {
            throw APIError.unprocessable(
                ValidationError(field: "starts_at", message: "must be at most 30 days before now and at most 10 years after."))
        }
        let id = UUID()
        let created = try await tenant { tx, _ in
            var zone = zoneName ?? ""
            if zoneName == nil { zone = try await tx.organisation().defaultTimezone }
            let recurrence: Recurrence
            do {
                recurrence = try Recurrence(rule: body.rule, start: startsAt, timeZone: TimeZone(identifier: zone) ?? .gmt)
            } catch let invalid as Recurrence.Invalid {
                throw APIError.unprocessable(ValidationError(field: "rule", message: invalid.description))
            }
            // The type and the audience's names are checked as notify checks them (nothing is read
            // of the audience's users: planning it held every user in memory).
            try await mappingEngineErrors { try await tx.checkEventRequest(request) }
            // A rule whose UNTIL or COUNT ended before now would make a schedule that never sends.
            guard let first = recurrence.occurrences(after: max(now, startsAt.addingTimeInterval(-1)), limit: 1).first else {
                throw APIError.unprocessable(
                    ValidationError(
                        field: "rule", message: "has no occurrence from now on (its UNTIL or COUNT ends before): nothing would be sent."))
            }
            let schedule = try await tx.createSchedule(
                id: id, name: name, event: request, rule: body.rule, timeZone: zone, startsAt: startsAt, nextAt: first)
            try await tx.audit(
                action: "schedule.create", targetType: "schedule", targetID: id.lowercased, before: nil,
                after: try scheduleAudit(schedule))
            return schedule
        }
        return .created(.init(body: .json(try .init(created))))
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
            payload: try convert(schedule.event.payload), rule: schedule.rule, timeZone: schedule.timeZone, startsAt: schedule.startsAt,
            state: state, nextOccurrences: next, sent: schedule.sent, skipped: schedule.skipped, lastOccurrenceAt: schedule.lastAt,
            lastEventId: schedule.lastEventID?.lowercased, lastError: schedule.lastError, createdAt: schedule.createdAt)
    }
}
