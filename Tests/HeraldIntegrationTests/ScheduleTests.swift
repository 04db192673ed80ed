import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import NIOCore
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// Recurring schedules (issue 11): an event on an RRULE in a time zone, each occurrence sent
/// once (notify and the move to the next occurrence in one transaction, under the idempotency
/// key schedule:<id>:<occurrence>), against the real database, on an injected clock.
@Suite("Recurring schedules")
struct ScheduleTests {
    /// Runs `count` schedule runners of `organisation` at `now` until nothing is due; how many
    /// occurrences they took.
    @discardableResult
    func runDue(_ organisation: UUID, at now: Date, runners count: Int = 1) async throws -> Int {
        let env = try await TestEnvironment.shared
        return try await withThrowingTaskGroup(of: Int.self) { group in
            for index in 0..<count {
                group.addTask {
                    let name = "schedule-test-\(index)-\(UUID().uuidString.prefix(6))"
                    let runner = WorkRunner(
                        configuration: WorkRunnerConfiguration(name: name),
                        queue: ScheduleQueue(database: env.database, organisation: organisation, now: { now }),
                        handler: ScheduleHandler(database: env.database, worker: name, now: { now }),
                        bus: NotificationBus(client: env.appClient, logger: env.logger), logger: env.logger)
                    return try await runner.runDue()
                }
            }
            return try await group.reduce(0, +)
        }
    }

    /// The events a schedule sent, by their idempotency keys.
    func sent(_ org: TestOrganisation, by schedule: UUID) async throws -> [String] {
        try await org.store { tx in
            try await tx.query(
                """
                SELECT idempotency_key FROM events WHERE organisation_id = \(org.id)
                  AND idempotency_key LIKE \("schedule:\(schedule.lowercased):%") ORDER BY deliver_at
                """
            ).map { try $0.decode(String.self) }
        }
    }

    func create(
        _ client: some TestClientProtocol, _ org: TestOrganisation, rule: String, zone: String = "Europe/Paris"
    ) async throws -> Components.Schemas.Schedule {
        let body = """
            {"name": "Reminder", "rule": "\(rule)", "time_zone": "\(zone)",
             "event": {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]}, "payload": {"title": "Timesheet"}}}
            """
        let created = try await client.send(.post, "/v1/schedules", token: org.ownerToken, json: body)
        #expect(created.status == .created, "\(created.text)")
        return try created.decoded(Components.Schemas.Schedule.self)
    }

    @Test("a schedule shows its next occurrences in its zone; a bad rule, a fixed time or an unknown audience is refused")
    func createAndValidate() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let other = try await TestOrganisation.make()
        try await TestEnvironment.shared.application().test(.router) { client in
            let schedule = try await create(client, org, rule: "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0")
            #expect(schedule.state == .active && schedule._type == "TASK_ASSIGNED")
            let next = schedule.nextOccurrences
            #expect(next.count == 5)
            var paris = Calendar(identifier: .gregorian)
            paris.timeZone = TimeZone(identifier: "Europe/Paris")!
            #expect(next.allSatisfy { paris.component(.weekday, from: $0) == 6 && paris.component(.hour, from: $0) == 16 })
            let id = schedule.id
            #expect(try await client.send(.get, "/v1/schedules/\(id)", token: org.ownerToken).status == .ok)
            let listed = try await client.send(.get, "/v1/schedules", token: org.ownerToken)
            #expect(try listed.decoded(Components.Schemas.SchedulePage.self).items.count == 1)

            func refused(_ json: String, _ field: String, _ said: String) async throws {
                let answer = try await client.send(.post, "/v1/schedules", token: org.ownerToken, json: json)
                #expect(
                    answer.isProblem(.unprocessableContent) && answer.text.contains(field) && answer.text.contains(said), "\(answer.text)")
            }
            let member = org.memberID.uuidString.lowercased()
            try await refused(
                #"{"name": "x", "rule": "FREQ=HOURLY", "event": {"type": "TASK_ASSIGNED", "audience": {"everyone": true}}}"#, "rule",
                "HOURLY")
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY;BYSETPOS=1", "event": {"type": "TASK_ASSIGNED", "audience": {"everyone": true}}}"#,
                "rule",
                "BYSETPOS")
            // A rule that ended before now would never send.
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY;UNTIL=20001231T000000Z", "event": {"type": "TASK_ASSIGNED", "audience": {"everyone": true}}}"#,
                "rule", "no occurrence from now on")
            // A fixed time has no place in a recurring event: the body says so (400, the schema refuses it).
            let fixed = try await client.send(
                .post, "/v1/schedules", token: org.ownerToken,
                json:
                    #"{"name": "x", "rule": "FREQ=DAILY", "event": {"type": "TASK_ASSIGNED", "audience": {"everyone": true}, "deliver_at": "2027-01-01T00:00:00Z"}}"#
            )
            #expect(fixed.isProblem(.badRequest) || fixed.isProblem(.unprocessableContent), "\(fixed.text)")
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY", "event": {"type": "NOPE", "audience": {"everyone": true}}}"#, "event.type", "NOPE")
            // A start centuries ago is refused at once (occurrences count from the start).
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY", "starts_at": "0259-08-29T06:16:21Z", "event": {"type": "TASK_ASSIGNED", "audience": {"everyone": true}}}"#,
                "starts_at", "30 days")
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY", "event": {"type": "TASK_ASSIGNED", "audience": {"groups": ["ghosts"]}}}"#,
                "event.audience",
                "ghosts")
            try await refused(
                #"{"name": "x", "rule": "FREQ=DAILY", "time_zone": "Mars/Olympus", "event": {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}}}"#,
                "time_zone", "IANA")
            // Reading needs events.read, creating events.send: a member has neither.
            #expect(try await client.send(.get, "/v1/schedules", token: org.memberToken).isProblem(.forbidden))
            // Another organisation's schedule is not there.
            for (method, path) in [(HTTPRequest.Method.get, ""), (.post, "/pause"), (.post, "/resume"), (.delete, "")] {
                #expect(try await client.send(method, "/v1/schedules/\(id)\(path)", token: other.ownerToken).isProblem(.notFound))
            }
            #expect(try await org.store { tx in try await tx.schedule(UUID(uuidString: id)!) }.paused == false)
        }
    }

    @Test(
        "a group or role that a schedule with occurrences left sends to cannot be deleted (409 naming the schedule); once the schedule is gone it can"
    )
    func audienceInUse() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await TestEnvironment.shared.application().test(.router) { client in
            let group = try await client.send(
                .post, "/v1/groups", token: org.ownerToken, json: #"{"key": "night-shift", "name": "Night shift"}"#)
            #expect(group.status == .created, "\(group.text)")
            let role = try await client.send(
                .post, "/v1/roles", token: org.ownerToken,
                json: #"{"key": "triage", "name": "Triage", "permissions": ["notifications.read"]}"#)
            #expect(role.status == .created, "\(role.text)")
            let (groupID, roleID) = (try #require(group.json["id"] as? String), try #require(role.json["id"] as? String))
            let created = try await client.send(
                .post, "/v1/schedules", token: org.ownerToken,
                json: """
                    {"name": "Night round", "rule": "FREQ=DAILY;BYHOUR=22;BYMINUTE=0", "time_zone": "Europe/Paris",
                     "event": {"type": "TASK_ASSIGNED", "audience": {"groups": ["night-shift"], "roles": ["triage"]}, "payload": {"title": "Round"}}}
                    """)
            #expect(created.status == .created, "\(created.text)")
            let schedule = try #require(created.json["id"] as? String)
            // Paused, it still counts: resuming would fail.
            #expect(try await client.send(.post, "/v1/schedules/\(schedule)/pause", token: org.ownerToken).status == .ok)
            for path in ["/v1/groups/\(groupID)", "/v1/roles/\(roleID)"] {
                let refused = try await client.send(.delete, path, token: org.ownerToken)
                #expect(refused.isProblem(.conflict), "\(refused.text)")
                #expect(
                    (refused.json["detail"] as? String)?.hasPrefix(#"The schedule "Night round" sends to this"#) == true, "\(refused.text)")
            }
            #expect(try await client.send(.get, "/v1/groups/\(groupID)", token: org.ownerToken).status == .ok)
            #expect(try await client.send(.delete, "/v1/schedules/\(schedule)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.delete, "/v1/groups/\(groupID)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.delete, "/v1/roles/\(roleID)", token: org.ownerToken).status == .noContent)
        }
    }

    @Test("a create retried with its Idempotency-Key answers the first schedule: one schedule, one audit entry; another body is 422")
    func createIsIdempotent() async throws {
        try await withCatalogue { org, _, client in
            func create(_ name: String, key: String?) async throws -> TestResponse {
                let body = """
                    {"name": "\(name)", "rule": "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16", "time_zone": "Europe/Paris",
                     "event": {"type": "TASK_ASSIGNED", "audience": {"roles": ["clinician"]}, "payload": {"title": "Timesheet"}}}
                    """
                return try await client.send(
                    .post, "/v1/schedules", token: org.ownerToken, json: body,
                    headers: key.map { [HTTPField.Name("Idempotency-Key")!: $0] } ?? [:])
            }
            let first = try await create("Weekly", key: "weekly-1")
            let second = try await create("Weekly", key: "weekly-1")
            #expect(first.status == .created && second.status == .created, "\(second.text)")
            #expect(first.json["id"] as? String == second.json["id"] as? String)
            #expect(first.headers[HTTPField.Name("Idempotent-Replayed")!] == nil)
            #expect(second.headers[HTTPField.Name("Idempotent-Replayed")!] == "true")
            let other = try await create("Another name", key: "weekly-1")
            #expect(
                other.isProblem(.unprocessableContent) && (other.json["detail"] as? String ?? "").contains("Idempotency-Key"),
                "\(other.text)")
            // An event may use the same key: the namespaces are apart.
            let event = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type": "TASK_ASSIGNED", "audience": {"roles": ["clinician"]}, "payload": {"title": "x"}}"#,
                headers: [HTTPField.Name("Idempotency-Key")!: "weekly-1"])
            #expect(event.status == .accepted, "\(event.text)")
            // Without a key, two creates are two schedules.
            _ = try await create("Weekly", key: nil)
            let listed = try await client.send(.get, "/v1/schedules", token: org.ownerToken)
            #expect((listed.json["items"] as? [[String: Any]])?.count == 2, "\(listed.text)")
            let audit = try await client.send(.get, "/v1/audit-log?action=schedule.create", token: org.ownerToken)
            #expect((audit.json["items"] as? [Any])?.count == 2, "\(audit.text)")
            // Deleted, the key is free again.
            let id = try #require(first.json["id"] as? String)
            #expect(try await client.send(.delete, "/v1/schedules/\(id)", token: org.ownerToken).status == .noContent)
            let again = try await create("Weekly", key: "weekly-1")
            #expect(
                again.status == .created && again.json["id"] as? String != id
                    && again.headers[HTTPField.Name("Idempotent-Replayed")!] == nil)
        }
    }

    @Test("a reminder's rows expire a set time after each occurrence (expires_after_seconds), run by hand or on its rhythm")
    func occurrencesExpire() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let env = try await TestEnvironment.shared
        let created = try await env.application().test(.router) { client in
            let body = """
                {"name": "Weekly", "rule": "FREQ=DAILY;BYHOUR=9", "time_zone": "Europe/Paris",
                 "event": {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]},
                           "payload": {"title": "Timesheet"}, "expires_after_seconds": 86400}}
                """
            let answer = try await client.send(.post, "/v1/schedules", token: org.ownerToken, json: body)
            #expect(answer.status == .created, "\(answer.text)")
            #expect((answer.json["event"] as? [String: Any])?["expires_after_seconds"] as? Int == 86_400, "\(answer.text)")
            let short = body.replacingOccurrences(of: "86400", with: "59")
            let refused = try await client.send(.post, "/v1/schedules", token: org.ownerToken, json: short)
            #expect(
                refused.isProblem(.badRequest)
                    || (refused.isProblem(.unprocessableContent) && refused.text.contains("event.expires_after_seconds")), "\(refused.text)"
            )
            let schedule = try answer.decoded(Components.Schemas.Schedule.self)
            let run = try await client.send(.post, "/v1/schedules/\(schedule.id)/run", token: org.ownerToken)
            #expect(run.status == .accepted, "\(run.text)")
            return schedule
        }
        func expiries() async throws -> [(deliver: Date, expires: Date?)] {
            try await org.store { tx in
                try await tx.query(
                    """
                    SELECT n.visible_at, n.expires_at FROM notifications n
                    WHERE n.organisation_id = \(org.id) AND n.user_id = \(org.memberID) ORDER BY n.visible_at
                    """
                ).map { try $0.decode((Date, Date?).self) }
            }.map { (deliver: $0.0, expires: $0.1) }
        }
        // By hand: a day after it was sent.
        let byHand = try #require(try await expiries().first)
        #expect(byHand.expires.map { abs($0.timeIntervalSince(byHand.deliver) - 86_400) < 5 } == true, "\(byHand)")
        // On its rhythm: a day after the occurrence (sent a minute late, shown from then).
        let first = try #require(created.nextOccurrences.first)
        #expect(try await runDue(org.id, at: first.addingTimeInterval(60)) == 1)
        let occurrence = try #require(try await expiries().last)
        #expect(
            occurrence.deliver == first.addingTimeInterval(60) && occurrence.expires == first.addingTimeInterval(86_400), "\(occurrence)")
    }

    @Test("a notification type that a schedule with occurrences left sends cannot be deleted (409 naming it); once it is gone it can")
    func typeInUse() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await TestEnvironment.shared.application().test(.router) { client in
            let type = try await client.send(
                .post, "/v1/notification-types", token: org.ownerToken,
                json: #"{"key": "TEMP_TYPE", "name": "Temp", "category": "activity", "default_channels": ["in_app"]}"#)
            #expect(type.status == .created, "\(type.text)")
            let typeID = try #require(type.json["id"] as? String)
            let created = try await client.send(
                .post, "/v1/schedules", token: org.ownerToken,
                json: """
                    {"name": "Every morning", "rule": "FREQ=DAILY;BYHOUR=9;BYMINUTE=0", "time_zone": "UTC",
                     "event": {"type": "TEMP_TYPE", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]}, "payload": {}}}
                    """)
            #expect(created.status == .created, "\(created.text)")
            let schedule = try #require(created.json["id"] as? String)
            let refused = try await client.send(.delete, "/v1/notification-types/\(typeID)", token: org.ownerToken)
            #expect(refused.isProblem(.conflict), "\(refused.text)")
            #expect((refused.json["detail"] as? String)?.hasPrefix(#"The schedule "Every morning" sends this notification type"#) == true)
            #expect(try await client.send(.get, "/v1/schedules/\(schedule)", token: org.ownerToken).status == .ok)
            #expect(try await client.send(.delete, "/v1/schedules/\(schedule)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.delete, "/v1/notification-types/\(typeID)", token: org.ownerToken).status == .noContent)
        }
    }

    @Test(
        "PATCH changes a schedule: a new rule moves the next occurrence, a name keeps it, bad parts are refused, a claimed occurrence is not sent"
    )
    func update() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let other = try await TestOrganisation.make()
        try await TestEnvironment.shared.application().test(.router) { client in
            let schedule = try await create(client, org, rule: "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0")
            let path = "/v1/schedules/\(schedule.id)"
            var paris = Calendar(identifier: .gregorian)
            paris.timeZone = TimeZone(identifier: "Europe/Paris")!

            // A new rule: the next occurrences follow it at once.
            let moved = try await client.send(
                .patch, path, token: org.ownerToken, json: #"{"rule": "FREQ=WEEKLY;BYDAY=MO;BYHOUR=8;BYMINUTE=30"}"#)
            #expect(moved.status == .ok, "\(moved.text)")
            let monday = try moved.decoded(Components.Schemas.Schedule.self)
            #expect(monday.rule == "FREQ=WEEKLY;BYDAY=MO;BYHOUR=8;BYMINUTE=30" && monday.nextOccurrences.count == 5)
            #expect(
                monday.nextOccurrences.allSatisfy {
                    paris.component(.weekday, from: $0) == 2 && paris.component(.hour, from: $0) == 8
                        && paris.component(.minute, from: $0) == 30
                })
            // Another zone: the same wall time there.
            let tokyo = try await client.send(.patch, path, token: org.ownerToken, json: #"{"time_zone": "Asia/Tokyo"}"#)
            var japan = Calendar(identifier: .gregorian)
            japan.timeZone = TimeZone(identifier: "Asia/Tokyo")!
            let inTokyo = try tokyo.decoded(Components.Schemas.Schedule.self)
            #expect(inTokyo.timeZone == "Asia/Tokyo" && inTokyo.nextOccurrences.allSatisfy { japan.component(.hour, from: $0) == 8 })
            // A new name and event: the next occurrence stays, the event is the new one.
            let renamed = try await client.send(
                .patch, path, token: org.ownerToken,
                json:
                    #"{"name": "Monday round", "event": {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(org.memberID)"]}, "payload": {"title": "Round"}, "severity": "WARNING", "priority": "high", "tags": ["team:ward"], "url": "https://ward.example/round", "subject": {"type": "ward", "id": "W2"}, "actor": {"name": "Ana"}}}"#
            )
            let round = try renamed.decoded(Components.Schemas.Schedule.self)
            #expect(round.name == "Monday round" && round.nextOccurrences == inTokyo.nextOccurrences)
            #expect((renamed.json["payload"] as? [String: Any])?["title"] as? String == "Round")
            // The response shows the whole event, as PATCH takes it back.
            #expect(round.event._type == "TASK_ASSIGNED" && round.event.severity == .warning && round.event.priority == .high)
            #expect(round.event.tags == ["team:ward"] && round.event.url == "https://ward.example/round" && round.event.subject?.id == "W2")
            #expect(((renamed.json["event"] as? [String: Any])?["actor"] as? [String: Any])?["name"] as? String == "Ana")
            // The same rule sent back (a client saving what it read) is no change of rhythm.
            let same = try await client.send(
                .patch, path, token: org.ownerToken, json: #"{"rule": "\#(round.rule)", "time_zone": "Asia/Tokyo"}"#)
            #expect(try same.decoded(Components.Schemas.Schedule.self).nextOccurrences == round.nextOccurrences)

            // Refused, and nothing changes: a bad rule, a rule already over, an unknown type, an
            // unknown field, nothing at all; another organisation's schedule is not there.
            for (body, status, words) in [
                (#"{"rule": "FREQ=HOURLY"}"#, HTTPResponse.Status.unprocessableContent, "HOURLY"),
                (#"{"rule": "FREQ=DAILY;UNTIL=20001231T000000Z"}"#, .unprocessableContent, "no occurrence from now on"),
                (#"{"event": {"type": "NOPE", "audience": {"everyone": true}}}"#, .unprocessableContent, "NOPE"),
                (#"{"time_zone": "Mars/Olympus"}"#, .unprocessableContent, "time_zone"),
                (#"{"paused": true}"#, .badRequest, "is not a field this operation takes"),
                ("{}", .badRequest, "names no field"),
            ] {
                let refused = try await client.send(.patch, path, token: org.ownerToken, json: body)
                #expect(refused.isProblem(status) && refused.text.contains(words), "\(body): \(refused.text)")
            }
            #expect(try await client.send(.patch, path, token: other.ownerToken, json: #"{"name": "x"}"#).isProblem(.notFound))
            #expect(try await client.send(.patch, path, token: org.memberToken, json: #"{"name": "x"}"#).isProblem(.forbidden))
            let unchanged = try await client.send(.get, path, token: org.ownerToken).decoded(Components.Schemas.Schedule.self)
            #expect(unchanged.name == "Monday round" && unchanged.timeZone == "Asia/Tokyo")

            // An occurrence a runner claimed before the change is not sent: its fenced send finds
            // the lease gone.
            let id = try #require(UUID(uuidString: schedule.id))
            let claim = try await org.store { tx in
                let row = try #require(
                    try await tx.query(
                        """
                        UPDATE schedules SET lease_owner = 'runner', lease_expires_at = now() + interval '1 minute', attempts = attempts + 1
                        WHERE organisation_id = \(org.id) AND id = \(id) RETURNING attempts, next_at
                        """
                    ).first)
                let (attempt, next) = try row.decode((Int, Date).self)
                return ClaimedSchedule(organisationID: org.id, scheduleID: id, attempt: attempt, occurrence: next)
            }
            #expect(try await client.send(.patch, path, token: org.ownerToken, json: #"{"rule": "FREQ=DAILY;BYHOUR=7"}"#).status == .ok)
            let outcome = try await org.store { tx in
                try await tx.sendOccurrence(claim, worker: "runner", now: claim.occurrence, next: nil, skipped: 0)
            }
            #expect(outcome == .leaseLost)
            #expect(try await sent(org, by: id).isEmpty)
            let audited = try await org.store { tx in
                try await tx.query(
                    "SELECT count(*)::int FROM audit_log WHERE organisation_id = \(org.id) AND action = 'schedule.update' AND target_id = \(schedule.id)"
                ).first?.decode(Int.self)
            }
            // Four changes; the PATCH that sent the same rule back changed nothing and wrote no entry.
            #expect(audited == 4)
        }
    }

    @Test("a finished schedule whose group was deleted since cannot be brought back by a new rule (422), and deleting it no longer blocks")
    func finishedScheduleKeepsNoGroup() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await TestEnvironment.shared.application().test(.router) { client in
            let group = try await client.send(
                .post, "/v1/groups", token: org.ownerToken, json: #"{"key": "day-shift", "name": "Day shift"}"#)
            let groupID = try #require(group.json["id"] as? String)
            let created = try await client.send(
                .post, "/v1/schedules", token: org.ownerToken,
                json:
                    #"{"name": "Once", "rule": "FREQ=DAILY;BYHOUR=9;COUNT=1", "event": {"type": "TASK_ASSIGNED", "audience": {"groups": ["day-shift"]}}}"#
            )
            let schedule = try created.decoded(Components.Schemas.Schedule.self)
            #expect(try await runDue(org.id, at: try #require(schedule.nextOccurrences.first).addingTimeInterval(60)) == 1)
            // Finished: the group may go.
            #expect(try await client.send(.delete, "/v1/groups/\(groupID)", token: org.ownerToken).status == .noContent)
            let revived = try await client.send(
                .patch, "/v1/schedules/\(schedule.id)", token: org.ownerToken, json: #"{"rule": "FREQ=DAILY;BYHOUR=9"}"#)
            #expect(revived.isProblem(.unprocessableContent) && revived.text.contains("day-shift"), "\(revived.text)")
        }
    }

    @Test("each occurrence is sent once, by one of two runners, under its own idempotency key; COUNT ends the schedule")
    func occurrencesOnce() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let created = try await TestEnvironment.shared.application().test(.router) { client in
            try await create(client, org, rule: "FREQ=DAILY;BYHOUR=9;BYMINUTE=0;COUNT=3")
        }
        let id = try #require(UUID(uuidString: created.id))
        let occurrences = created.nextOccurrences
        #expect(occurrences.count == 3)
        // Before the first: nothing. At it, two runners: one event.
        #expect(try await runDue(org.id, at: occurrences[0].addingTimeInterval(-60), runners: 2) == 0)
        #expect(try await runDue(org.id, at: occurrences[0].addingTimeInterval(60), runners: 2) == 1)
        #expect(try await sent(org, by: id) == ["schedule:\(id.lowercased):\(Int(occurrences[0].timeIntervalSince1970))"])
        #expect(try await runDue(org.id, at: occurrences[0].addingTimeInterval(120)) == 0)
        let schedule = try await org.store { tx in try await tx.schedule(id) }
        #expect(schedule.sent == 1 && schedule.nextAt == occurrences[1] && schedule.lastEventID != nil)
        // The event is the member's task, delivered at the occurrence.
        let event = try await org.store { tx in try await tx.event(schedule.lastEventID!) }
        // (sent a minute late on this clock, it is delivered when it is sent)
        #expect(event.typeKey == "TASK_ASSIGNED" && abs(event.deliverAt.timeIntervalSince(occurrences[0])) <= 60, "\(event.deliverAt)")
        #expect(event.scheduleID == id)
        // The rest, then nothing: the schedule is finished.
        #expect(try await runDue(org.id, at: occurrences[1].addingTimeInterval(60), runners: 2) == 1)
        #expect(try await runDue(org.id, at: occurrences[2].addingTimeInterval(60), runners: 2) == 1)
        #expect(try await sent(org, by: id).count == 3)
        let finished = try await org.store { tx in try await tx.schedule(id) }
        #expect(finished.nextAt == nil && finished.sent == 3)
        #expect(try await runDue(org.id, at: occurrences[2].addingTimeInterval(30 * 86_400)) == 0)
    }

    @Test(
        "run now: the event is sent at once, names its schedule, lists under it (also once deleted); a key sends it once; the rhythm is kept"
    )
    func runNow() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        try await TestEnvironment.shared.application().test(.router) { client in
            let schedule = try await create(client, org, rule: "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0")
            let run = try await client.send(.post, "/v1/schedules/\(schedule.id)/run", token: org.ownerToken)
            #expect(run.status == .accepted && run.headers[.init("Idempotent-Replayed")!] == nil, "\(run.text)")
            let accepted = try run.decoded(Components.Schemas.EventAccepted.self)
            #expect(accepted.counts.inApp == 1)
            // The member sees it now; the event names the schedule and who ran it.
            let feed = try await client.send(.get, "/v1/me/notifications", token: org.memberToken)
            #expect(try feed.decoded(Components.Schemas.FeedPage.self).items.map(\.eventId) == [accepted.eventId])
            let event = try await client.send(.get, "/v1/events/\(accepted.eventId)", token: org.ownerToken)
                .decoded(Components.Schemas.Event.self)
            #expect(event.scheduleId == schedule.id && event.sentBy.id == org.ownerID.uuidString.lowercased())
            // With a key: once, then the first answer again.
            let key: HTTPFields = [.init("Idempotency-Key")!: "try-1"]
            let first = try await client.send(.post, "/v1/schedules/\(schedule.id)/run", token: org.ownerToken, headers: key)
            let again = try await client.send(.post, "/v1/schedules/\(schedule.id)/run", token: org.ownerToken, headers: key)
            #expect(again.status == .accepted && again.headers[.init("Idempotent-Replayed")!] == "true")
            #expect(
                try first.decoded(Components.Schemas.EventAccepted.self).eventId
                    == again.decoded(Components.Schemas.EventAccepted.self).eventId)
            // Not an occurrence: the schedule's count and next occurrences stay.
            let after = try await client.send(.get, "/v1/schedules/\(schedule.id)", token: org.ownerToken)
                .decoded(Components.Schemas.Schedule.self)
            #expect(after.sent == 0 && after.nextOccurrences == schedule.nextOccurrences)
            let audited = try await client.send(.get, "/v1/audit-log?action=schedule.run", token: org.ownerToken)
            #expect((audited.json["items"] as? [Any])?.count == 2)
            // What the schedule sent, also after it is deleted; another event is not listed.
            _ = try await client.send(
                .post, "/v1/events", token: org.ownerToken,
                json: #"{"type":"TASK_ASSIGNED","audience":{"user_ids":["\#(org.memberID.uuidString.lowercased())"]},"payload":{}}"#)
            #expect(try await client.send(.delete, "/v1/schedules/\(schedule.id)", token: org.ownerToken).status == .noContent)
            let listed = try await client.send(.get, "/v1/events?schedule_id=\(schedule.id)", token: org.ownerToken)
                .decoded(Components.Schemas.EventPage.self)
            #expect(listed.items.count == 2 && listed.items.allSatisfy { $0.scheduleId == schedule.id })
            #expect(
                try await client.send(.get, "/v1/events", token: org.ownerToken).decoded(Components.Schemas.EventPage.self).items.count == 3
            )
            #expect(try await client.send(.post, "/v1/schedules/\(schedule.id)/run", token: org.ownerToken).isProblem(.notFound))
        }
    }

    @Test("running a schedule by hand spends the organisation's events rate, as a notify does")
    func runSpendsEvents() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        // A clock that stands still: the bucket does not refill between the two runs.
        let clock = TestClock()
        let app = try await TestEnvironment.shared.rateLimited(events: 1, requests: 0, clock: clock)
        try await app.test(.router) { client in
            let id = try await create(client, org, rule: "FREQ=DAILY;BYHOUR=9").id
            let first = try await client.send(.post, "/v1/schedules/\(id)/run", token: org.ownerToken)
            #expect(
                first.status == .accepted && first.headers[HTTPField.Name("RateLimit-Policy")!] == #""events";q=1;w=1"#, "\(first.headers)")
            let second = try await client.send(.post, "/v1/schedules/\(id)/run", token: org.ownerToken)
            #expect(second.isProblem(.tooManyRequests), "\(second.text)")
        }
    }

    @Test("an occurrence already sent under its key is not sent again; missed occurrences are skipped, the latest is sent")
    func idempotencyAndCatchUp() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let env = try await TestEnvironment.shared
        let created = try await env.application().test(.router) { client in try await create(client, org, rule: "FREQ=DAILY;BYHOUR=9") }
        let id = try #require(UUID(uuidString: created.id))
        let first = try #require(created.nextOccurrences.first)
        // A worker sends the first occurrence; then (as if its move to the next had been lost)
        // the schedule points at it again: the next worker finds it sent under its key.
        #expect(try await runDue(org.id, at: first.addingTimeInterval(60)) == 1)
        _ = try await org.store { tx in
            try await tx.query("UPDATE schedules SET next_at = \(first) WHERE organisation_id = \(org.id) AND id = \(id)")
        }
        #expect(try await runDue(org.id, at: first.addingTimeInterval(60)) == 1)
        #expect(try await sent(org, by: id).count == 1)
        // Three days without any instance running: one late reminder, two skipped.
        let late = first.addingTimeInterval(3 * 86_400 + 3_600)
        #expect(try await runDue(org.id, at: late) == 1)
        let schedule = try await org.store { tx in try await tx.schedule(id) }
        #expect(try await sent(org, by: id).count == 2 && schedule.skipped == 2, "skipped \(schedule.skipped)")
        #expect(schedule.nextAt == first.addingTimeInterval(4 * 86_400))

        // Paused, nothing goes; resumed, it goes on from the first occurrence after now.
        try await env.application().test(.router) { client in
            // Eight at once: each answers the paused schedule, one changes it (and is audited).
            let answers = try await withThrowingTaskGroup(of: TestResponse.self) { group in
                for _ in 0..<8 {
                    group.addTask { try await client.send(.post, "/v1/schedules/\(id.lowercased)/pause", token: org.ownerToken) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            for answer in answers {
                #expect(try answer.decoded(Components.Schemas.Schedule.self).state == .paused, "\(answer.text)")
            }
            let paused = try answers[0].decoded(Components.Schemas.Schedule.self)
            #expect(paused.state == .paused && paused.nextOccurrences.isEmpty)
            // Pausing again changes nothing and audits nothing.
            let again = try await client.send(.post, "/v1/schedules/\(id.lowercased)/pause", token: org.ownerToken)
            #expect(try again.decoded(Components.Schemas.Schedule.self).state == .paused)
            #expect(try await runDue(org.id, at: first.addingTimeInterval(10 * 86_400)) == 0)
            let resumed = try await client.send(.post, "/v1/schedules/\(id.lowercased)/resume", token: org.ownerToken)
            let active = try resumed.decoded(Components.Schemas.Schedule.self)
            #expect(active.state == .active, "\(resumed.text)")
            _ = try await client.send(.post, "/v1/schedules/\(id.lowercased)/resume", token: org.ownerToken)
            // One entry each, with the schedule as the API shows it before and after.
            let audited = try await client.send(.get, "/v1/audit-log?target_id=\(id.lowercased)", token: org.ownerToken)
            let entries = (audited.json["items"] as? [[String: Any]]) ?? []
            let actions = entries.compactMap { $0["action"] as? String }
            #expect(
                actions.filter { $0 == "schedule.pause" }.count == 1 && actions.filter { $0 == "schedule.resume" }.count == 1, "\(actions)")
            let pause = entries.first { $0["action"] as? String == "schedule.pause" }
            #expect((pause?["before"] as? [String: Any])?["state"] as? String == "ACTIVE", "\(audited.text.prefix(500))")
            #expect((pause?["after"] as? [String: Any])?["state"] as? String == "PAUSED")
            // Never the event's payload: the audit log is kept for good.
            #expect((pause?["before"] as? [String: Any])?["payload"] == nil && (pause?["before"] as? [String: Any])?["name"] != nil)
            let next = active.nextOccurrences.first
            #expect(next.map { $0 > Date() && $0 <= Date().addingTimeInterval(86_400) } == true)
            #expect(try await client.send(.delete, "/v1/schedules/\(id.lowercased)", token: org.ownerToken).status == .noContent)
            #expect(try await client.send(.get, "/v1/schedules/\(id.lowercased)", token: org.ownerToken).isProblem(.notFound))
        }
    }
}
