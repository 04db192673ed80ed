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

/// Scheduled jobs and retention (issue 11): system jobs per organisation, one instance per due
/// run, fenced completion, the API and the CLI, against the real database. Due times follow an
/// injected clock; nothing sleeps until 03:30.
@Suite("Jobs")
struct JobTests {
    /// Runs every job of `organisation` that is due by `now` (or asked for), through the same
    /// claim, lease and fence as `herald worker`; returns how many runs it made.
    @discardableResult
    func runDueJobs(
        _ organisation: UUID, now: Date = Date(), batch: Int = 2_000, name: String = "jobs-test", only job: SystemJob? = nil
    ) async throws -> Int {
        let env = try await TestEnvironment.shared
        var configuration = WorkRunnerConfiguration(name: "\(name)-\(UUID().uuidString.prefix(6))")
        configuration.batchSize = 4
        let runner = WorkRunner(
            configuration: configuration,
            queue: JobQueue(database: env.workerDatabase, organisation: organisation, name: job, now: { now }),
            handler: JobHandler(database: env.workerDatabase, batch: batch, now: { now }),
            bus: NotificationBus(client: env.workerClient, logger: env.logger), logger: env.logger)
        return try await runner.runDue()
    }

    /// An ISQ alert to the member (in-app and email), created `daysAgo` days ago; its email
    /// deliveries end `status`, each with one attempt and one click when SENT.
    func alert(
        _ org: TestOrganisation, daysAgo: Int, status: DeliveryStatus = .sent, deliverInDays: Int? = nil
    ) async throws -> UUID {
        let deliverAt = deliverInDays.map { Date().addingTimeInterval(TimeInterval($0) * 86_400) }
        let id = try await org.notify(
            EventRequest(
                typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]),
                payload: .object(["implant": .string("A-\(daysAgo)"), "isq": .number(41), "threshold": .number(55)]),
                deliverAt: deliverAt)
        ).event.id
        try await org.store { tx in
            let back = "\(daysAgo) days"
            try await tx.query(
                """
                UPDATE events SET created_at = now() - \(back)::interval,
                    deliver_at = CASE WHEN deliver_at > now() THEN deliver_at ELSE now() - \(back)::interval END
                WHERE organisation_id = \(org.id) AND id = \(id)
                """)
            try await tx.query("UPDATE deliveries SET status = \(status) WHERE organisation_id = \(org.id) AND event_id = \(id)")
            if status == .sent {
                for delivery in try await tx.query("SELECT id FROM deliveries WHERE organisation_id = \(org.id) AND event_id = \(id)") {
                    let deliveryID = try delivery.decode(UUID.self)
                    try await tx.query(
                        """
                        INSERT INTO delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome)
                        VALUES (\(org.id), \(deliveryID), 1, 'test', now(), 'SENT')
                        """)
                    try await tx.query(
                        "INSERT INTO link_clicks (organisation_id, delivery_id, user_id) VALUES (\(org.id), \(deliveryID), \(org.memberID))"
                    )
                }
            }
        }
        return id
    }

    /// How many rows each table holds for `event`.
    func rows(_ org: TestOrganisation, of event: UUID) async throws -> [String: Int] {
        try await org.store { tx in
            let row = try await tx.query(
                """
                SELECT (SELECT count(*) FROM events WHERE organisation_id = \(org.id) AND id = \(event))::int,
                       (SELECT count(*) FROM notifications WHERE organisation_id = \(org.id) AND event_id = \(event))::int,
                       (SELECT count(*) FROM deliveries WHERE organisation_id = \(org.id) AND event_id = \(event))::int,
                       (SELECT count(*) FROM event_recipients WHERE organisation_id = \(org.id) AND event_id = \(event))::int,
                       (SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.organisation_id = a.organisation_id
                          AND d.id = a.delivery_id WHERE a.organisation_id = \(org.id) AND d.event_id = \(event))::int,
                       (SELECT count(*) FROM link_clicks c JOIN deliveries d ON d.organisation_id = c.organisation_id
                          AND d.id = c.delivery_id WHERE c.organisation_id = \(org.id) AND d.event_id = \(event))::int
                """
            ).first!
            let (events, notifications, deliveries, traces, attempts, clicks) = try row.decode((Int, Int, Int, Int, Int, Int).self)
            return [
                "events": events, "notifications": notifications, "deliveries": deliveries, "decision_traces": traces,
                "delivery_attempts": attempts, "link_clicks": clicks,
            ]
        }
    }

    @Test("every organisation has its system jobs on their default schedules, in its time zone")
    func systemJobs() async throws {
        let org = try await TestOrganisation.make()
        try await org.store { tx in _ = try await tx.updateOrganisation(name: nil, defaultLocale: nil, defaultTimezone: "Europe/Paris") }
        let app = try await TestEnvironment.shared.application()
        try await app.test(.router) { client in
            // The zone changed after the jobs were made: retention's next run moved with it.
            let listed = try await client.send(.get, "/v1/jobs", token: org.ownerToken)
            #expect(listed.status == .ok, "\(listed.text)")
            let items = try listed.decoded(Components.Schemas.JobList.self).items
            #expect(items.map(\.name) == [.inactivity, .purgeExpired, .retention])
            let retention = try #require(items.first { $0.name == .retention })
            #expect(retention.cron == "30 3 * * *" && retention.timeZone == "Europe/Paris")
            let next = retention.nextRunAt
            var paris = Calendar(identifier: .gregorian)
            paris.timeZone = TimeZone(identifier: "Europe/Paris")!
            #expect(paris.component(.hour, from: next) == 3 && paris.component(.minute, from: next) == 30)
            #expect(next > Date() && next <= Date().addingTimeInterval(86_400))
            let purge = try #require(items.first { $0.name == .purgeExpired })
            #expect(purge.intervalSeconds == 900 && purge.cron == nil && purge.lastRun == nil)
            // Reading jobs needs jobs.read: a member has it not.
            #expect(try await client.send(.get, "/v1/jobs", token: org.memberToken).isProblem(.forbidden))
        }
    }

    @Test("retention deletes only what is older than the organisation's retention, child rows first, in bounded batches")
    func retention() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let other = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: other)
        let old = try await alert(org, daysAgo: 100)
        let oldPending = try await alert(org, daysAgo: 100, status: .pending)
        let oldScheduled = try await alert(org, daysAgo: 100, status: .pending, deliverInDays: 30)
        let recent = try await alert(org, daysAgo: 40)
        let othersOld = try await alert(other, daysAgo: 100)
        let before = try await rows(org, of: old)
        #expect(before.values.allSatisfy { $0 >= 1 }, "\(before)")

        let job = try await org.store { tx in try await tx.requestJobRun(try await tx.job(named: .retention).id) }
        // Batches of one row: every loop of the bounded deletion runs many times.
        #expect(try await runDueJobs(org.id, batch: 1) == 1)
        let left = try await rows(org, of: old)
        #expect(left.values.allSatisfy { $0 == 0 }, "\(left)")
        for kept in [oldPending, oldScheduled, recent] {
            #expect(try await rows(org, of: kept)["events"] == 1)
        }
        // Another organisation's old event is its own retention's business.
        let others = try await rows(other, of: othersOld)
        #expect(others.values.allSatisfy { $0 >= 1 }, "\(others)")

        let run = try #require(try await org.store { tx in try await tx.job(job.id) }.lastRun)
        #expect(run.status == .succeeded && run.trigger == .manual && run.error == nil)
        #expect(run.counts["events"] == 1 && run.counts["notifications"] == before["notifications"])
        #expect(run.counts["deliveries"] == before["deliveries"] && run.counts["delivery_attempts"] == before["delivery_attempts"])
        #expect(run.counts["link_clicks"] == before["link_clicks"] && run.counts["decision_traces"] == before["decision_traces"])
        // A run asked for by hand leaves the schedule as it was.
        #expect(try await org.store { tx in try await tx.job(job.id) }.nextRunAt == job.nextRunAt)

        // A shorter retention takes the 40-day-old event at the next run.
        try await org.store { tx in
            _ = try await tx.updateOrganisation(name: nil, defaultLocale: nil, defaultTimezone: nil, retentionDays: 30)
        }
        _ = try await org.store { tx in try await tx.requestJobRun(job.id) }
        try await runDueJobs(org.id)
        #expect(try await rows(org, of: recent)["events"] == 0)
        #expect(try await rows(org, of: oldPending)["events"] == 1)
    }

    @Test("a due run is taken by one instance only; an expired lease ends the run ABANDONED and the late worker is fenced off")
    func exactlyOnce() async throws {
        let org = try await TestOrganisation.make()
        let env = try await TestEnvironment.shared
        let job = try await org.store { tx in try await tx.job(named: .purgeExpired) }
        // Its time comes on the injected clock: two runners race for it. The clock is near the
        // real one, and the daily jobs (retention at 03:30, inactivity at 04:30) come due within
        // the half hour it moves forward between 03:00 and 03:30 or 04:00 and 04:30: only the
        // purge is claimed here, or the test failed at those times of day.
        let now = job.nextRunAt.addingTimeInterval(1)
        async let first = runDueJobs(org.id, now: now, name: "one", only: .purgeExpired)
        async let second = runDueJobs(org.id, now: now, name: "two", only: .purgeExpired)
        #expect(try await first + second == 1)
        let runs = try await org.store { tx in try await tx.jobRuns(of: job.id, limit: 10, after: nil) }.items
        #expect(runs.count == 1 && runs[0].status == .succeeded && runs[0].trigger == .schedule && runs[0].scheduledFor == job.nextRunAt)
        // The next run is the first interval after the clock, not after the missed time.
        let after = try await org.store { tx in try await tx.job(job.id) }
        #expect(after.nextRunAt == now.addingTimeInterval(900) && after.status == .idle)

        // A worker claims it and stops answering: its lease expires.
        let due = after.nextRunAt.addingTimeInterval(1)
        let stalled = try #require(
            try await env.workerDatabase.claimJobs(
                worker: "stalled", limit: 5, leaseSeconds: 60, now: due, organisation: org.id, name: .purgeExpired
            ).first)
        _ = try await env.workerDatabase.withTenant(org.id) { tx in
            try await tx.query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE organisation_id = \(org.id)")
        }
        let rescued = try #require(
            try await env.workerDatabase.claimJobs(
                worker: "rescuer", limit: 5, leaseSeconds: 60, now: due, organisation: org.id, name: .purgeExpired
            ).first)
        #expect(rescued.jobID == job.id && rescued.attempt == stalled.attempt + 1 && rescued.runID != stalled.runID)
        let late = try await env.workerDatabase.withTenant(org.id) { tx in
            try await tx.completeJobRun(stalled, worker: "stalled", outcome: JobOutcome(), duration: .seconds(1), now: due, nextRunAt: due)
        }
        #expect(!late)
        let recorded = try await env.workerDatabase.withTenant(org.id) { tx in
            try await tx.completeJobRun(
                rescued, worker: "rescuer", outcome: JobOutcome(counts: ["notifications": 0]), duration: .seconds(1), now: due,
                nextRunAt: due.addingTimeInterval(900))
        }
        #expect(recorded)
        let history = try await org.store { tx in try await tx.jobRuns(of: job.id, limit: 10, after: nil) }.items
        #expect(history.map(\.status) == [.succeeded, .abandoned, .succeeded], "\(history.map(\.status))")
        #expect(history[1].error?.contains("lease expired") == true)
    }

    @Test("the API lists, shows and runs jobs with their history; another organisation's job is not there")
    func api() async throws {
        let org = try await TestOrganisation.make()
        let other = try await TestOrganisation.make()
        let otherJob = try await other.store { tx in try await tx.job(named: .retention) }
        // An in-app row that expired yesterday.
        _ = try await TestCatalogue.make(in: org)
        let expired = try await org.notify(
            EventRequest(
                typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.memberID]), payload: .object(["title": .string("Old")]),
                expiresAt: Date().addingTimeInterval(3600))
        ).event.id
        _ = try await org.store { tx in
            try await tx.query(
                "UPDATE notifications SET expires_at = now() - interval '1 day' WHERE organisation_id = \(org.id) AND event_id = \(expired)"
            )
        }
        let app = try await TestEnvironment.shared.application()
        try await app.test(.router) { client in
            let purge = try await org.store { tx in try await tx.job(named: .purgeExpired) }
            let path = "/v1/jobs/\(purge.id.lowercased)"
            let asked = try await client.send(.post, path + "/run", token: org.ownerToken)
            #expect(asked.status == .accepted, "\(asked.text)")
            let requested = try asked.decoded(Components.Schemas.Job.self)
            #expect(requested.runRequestedAt != nil && requested.name == .purgeExpired)
            #expect(try await runDueJobs(org.id) == 1)
            let shown = try await client.send(.get, path, token: org.ownerToken)
            let shownJob = try shown.decoded(Components.Schemas.Job.self)
            let last = try #require(shownJob.lastRun, "\(shown.text)")
            #expect(last.status == .succeeded && last.trigger == .manual)
            #expect(last.counts.additionalProperties["notifications"] == 1 && shownJob.runRequestedAt == nil)
            let runs = try await client.send(.get, path + "/runs?limit=1", token: org.ownerToken)
            #expect(try runs.decoded(Components.Schemas.JobRunPage.self).items.count == 1, "\(runs.text)")
            #expect(try await org.notificationIDs(of: org.memberID).isEmpty)

            // Another organisation's job: not found, whatever the verb.
            let foreign = "/v1/jobs/\(otherJob.id.lowercased)"
            #expect(try await client.send(.get, foreign, token: org.ownerToken).isProblem(.notFound))
            #expect(try await client.send(.get, foreign + "/runs", token: org.ownerToken).isProblem(.notFound))
            #expect(try await client.send(.post, foreign + "/run", token: org.ownerToken).isProblem(.notFound))
            #expect(try await other.store { tx in try await tx.job(otherJob.id) }.runRequestedAt == nil)
            // Running needs jobs.manage.
            #expect(try await client.send(.post, path + "/run", token: org.memberToken).isProblem(.forbidden))
            // The retention setting is checked.
            let zero = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"retention_days": 0}"#)
            #expect(zero.isProblem(.unprocessableContent) && zero.text.contains("retention_days"), "\(zero.text)")
            let set = try await client.send(.patch, "/v1/organisation", token: org.ownerToken, json: #"{"retention_days": 30}"#)
            #expect(set.status == .ok, "\(set.text)")
            #expect(try set.decoded(Components.Schemas.Organisation.self).retentionDays == 30, "\(set.text)")
        }
    }

    @Test("herald jobs list and herald jobs run NAME print what they do")
    func command() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let owner = ["DATABASE_OWNER_URL": env.ownerURL]
        let listed = try await runHerald(["jobs", "list", "--organisation", org.slug], owner)
        #expect(listed.contains("\(org.id.lowercased) retention: cron '30 3 * * *' UTC") && listed.contains("purge-expired: every 900 s"))
        #expect(listed.contains("last run: none"), "\(listed)")
        let ran = try await runHerald(["jobs", "run", "retention", "--organisation", org.slug], owner)
        #expect(ran.contains("jobs run retention: asked for a run in 1 organisation(s)"), "\(ran)")
        #expect(ran.contains("organisation \(org.id.lowercased): SUCCEEDED manual") && ran.contains("1 run(s) finished"), "\(ran)")
        let job = try await org.store { tx in try await tx.job(named: .retention) }
        #expect(job.lastRun?.status == .succeeded && job.runRequestedAt == nil)
        // Audited as a run asked for through the API, naming the command and who ran it where.
        let audited = try await org.store { tx in
            try await tx.query(
                "SELECT actor_type, target_id, request_id FROM audit_log WHERE organisation_id = \(org.id) AND action = 'job.run'"
            ).map { try $0.decode((String, String, String).self) }
        }
        #expect(audited.count == 1 && audited.first?.0 == "system" && audited.first?.1 == job.id.lowercased, "\(audited)")
        #expect(audited.first?.2.hasPrefix("cli herald jobs run retention by ") == true, "\(audited)")
        // An unknown job is refused by name.
        let unknown = try await runHeraldExit(["jobs", "run", "vacuum"], owner)
        #expect(unknown.status != 0 && unknown.output.contains("No job is called 'vacuum'"), "\(unknown.output)")
    }

    @Test("scheduled events are visible as such: GET /v1/events?state=scheduled, and each event's state on the injected clock")
    func scheduledEvents() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let member = org.memberID.uuidString.lowercased()
        let tomorrow = Date().addingTimeInterval(86_400)
        @Sendable func task(_ title: String, at: Date? = nil) -> String {
            let deliver = at.map { #", "deliver_at": "\#($0.formatted(.iso8601))""# } ?? ""
            return #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(member)"]}, "payload": {"title": "\#(title)"}\#(deliver)}"#
        }
        let app = try await TestEnvironment.shared.application()
        let ids = try await app.test(.router) { client -> [String: String] in
            var ids: [String: String] = [:]
            for (name, at) in [("now", nil), ("tomorrow", tomorrow), ("cancelled", tomorrow)] as [(String, Date?)] {
                let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(name, at: at))
                #expect(sent.status == .accepted || sent.status == .created, "\(sent.text)")
                ids[name] = try sent.decoded(Components.Schemas.EventAccepted.self).eventId
            }
            #expect(try await client.send(.post, "/v1/events/\(ids["cancelled"]!)/cancel", token: org.ownerToken).status == .ok)
            func listed(_ state: String) async throws -> [String: Components.Schemas.Event.StatePayload] {
                let page = try await client.send(.get, "/v1/events?state=\(state)", token: org.ownerToken)
                #expect(page.status == .ok, "\(page.text)")
                let items = try page.decoded(Components.Schemas.EventPage.self).items
                return Dictionary(uniqueKeysWithValues: items.map { ($0.id, $0.state) })
            }
            #expect(try await listed("scheduled") == [ids["tomorrow"]!: .scheduled])
            #expect(try await listed("delivered") == [ids["now"]!: .delivered])
            #expect(try await listed("cancelled") == [ids["cancelled"]!: .cancelled])
            let one = try await client.send(.get, "/v1/events/\(ids["tomorrow"]!)", token: org.ownerToken)
            let event = try one.decoded(Components.Schemas.Event.self)
            #expect(event.state == .scheduled && event.status == .accepted)
            #expect(try await client.send(.get, "/v1/events?state=soon", token: org.ownerToken).isProblem(.badRequest))
            return ids
        }
        // The day after, on the application's clock, the scheduled event has been delivered.
        let env = try await TestEnvironment.shared
        let then = tomorrow.addingTimeInterval(60)
        let later = try env.application(now: { then })
        let token = try await env.tokens.issueAccessToken(organisationID: org.id, userID: org.ownerID, now: then)
        try await later.test(.router) { client in
            let one = try await client.send(.get, "/v1/events/\(ids["tomorrow"]!)", token: token)
            #expect(try one.decoded(Components.Schemas.Event.self).state == .delivered, "\(one.text)")
            let scheduled = try await client.send(.get, "/v1/events?state=scheduled", token: token)
            #expect(try scheduled.decoded(Components.Schemas.EventPage.self).items.isEmpty, "\(scheduled.text)")
        }
    }
}
