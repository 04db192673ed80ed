import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// The outbox's claim path on the real database: leases, fencing, rescue, retries, DEAD.
/// (Sending over SMTP, webhooks and chat belongs to the delivery issue and is not built yet.)
@Suite("Outbox: claim, lease, fence, retry")
struct OutboxTests {
    let env: TestEnvironment

    init() async throws {
        env = try await TestEnvironment.shared
    }

    /// An organisation with `count` pending email deliveries, due now.
    func outbox(_ count: Int) async throws -> (TestOrganisation, [UUID]) {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let users = try await org.store { tx in
            try await (0..<count).asyncMap { i in try await tx.createUser(NewUser(email: "r\(i)@x.example", displayName: "R\(i)")).id }
        }
        let (_, plan) = try await org.notify(
            EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: users), payload: .object([:])))
        return (org, plan.deliveries.map(\.id))
    }

    /// Claims until nothing of `org` is left to claim (confined to `org`, so tests running in
    /// parallel keep their rows).
    func claimAll(_ org: TestOrganisation, worker: String, lease: Int = 30) async throws -> [ClaimedDelivery] {
        var mine: [ClaimedDelivery] = []
        while true {
            let batch = try await env.workerDatabase.claimDeliveries(worker: worker, limit: 7, leaseSeconds: lease, organisation: org.id)
            if batch.isEmpty { break }
            mine += batch
        }
        return mine
    }

    @Test("several workers claiming at once: each row is claimed once per attempt")
    func oneClaimPerAttempt() async throws {
        let (org, ids) = try await outbox(40)
        let claims = try await withThrowingTaskGroup(of: [ClaimedDelivery].self) { group in
            for worker in 0..<6 { group.addTask { try await claimAll(org, worker: "w\(worker)") } }
            var all: [ClaimedDelivery] = []
            for try await batch in group { all += batch }
            return all
        }
        #expect(claims.count == ids.count)
        #expect(Set(claims.map(\.deliveryID)) == Set(ids))
        #expect(claims.allSatisfy { $0.attempt == 1 })
        // Every claim completes; the attempt log has one row per (delivery, attempt).
        for claim in claims {
            let worker = try await org.store { tx in try await tx.delivery(claim.deliveryID).leaseOwner }
            let done = try await env.workerDatabase.withTenant(org.id) { tx in
                try await tx.completeDelivery(claim, worker: try #require(worker), startedAt: Date(), result: .sent(responseCode: 250))
            }
            #expect(done)
        }
        let logged = try await org.store { tx in
            try await tx.query("SELECT count(*)::int, count(*) FILTER (WHERE attempt = 1 AND outcome = 'SENT')::int FROM delivery_attempts")
        }
        let (rows, firstSent) = try logged[0].decode((Int, Int).self)
        #expect(rows == ids.count && firstSent == ids.count)
    }

    @Test("attempts recorded in one batch: each fenced on its own, one attempt row each, the right final status")
    func batchedCompletion() async throws {
        let (org, ids) = try await outbox(4)
        _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET max_attempts = 1 WHERE id = \(ids[2])") }
        let claims = try await claimAll(org, worker: "batcher").sorted {
            ids.firstIndex(of: $0.deliveryID)! < ids.firstIndex(of: $1.deliveryID)!
        }
        #expect(claims.map(\.deliveryID) == ids)
        // The fourth row's lease moved on (another worker's attempt 2): its result must be refused.
        _ = try await org.store { tx in
            try await tx.query("UPDATE deliveries SET attempts = 2, lease_owner = 'other' WHERE id = \(ids[3])")
        }
        let retryAt = Date().addingTimeInterval(600)
        let recorded = try await env.workerDatabase.withTenant(org.id) { tx in
            try await tx.completeDeliveries(
                [
                    (claims[0], Date(), .sent(responseCode: 250, response: "250 ok")),
                    (claims[1], Date(), .failed(responseCode: 451, error: "busy", retryAt: retryAt)),
                    (claims[2], Date(), .failed(responseCode: 451, error: "busy", retryAt: retryAt)),
                    (claims[3], Date(), .sent(responseCode: 250)),
                ], worker: "batcher")
        }
        #expect(recorded == [true, true, true, false])
        let rows = try await org.store { tx in try await ids.asyncMap { (try await tx.delivery($0), try await tx.deliveryAttempts($0)) } }
        #expect(rows.map(\.0.status) == [.sent, .failed, .dead, .sending])
        #expect(rows[0].0.lastResponse == "250 ok" && rows[0].0.sentAt != nil)
        #expect(abs(rows[1].0.nextAttemptAt.timeIntervalSince(retryAt)) < 0.001)
        #expect(rows.map { $0.1.map(\.outcome) } == [[.sent], [.failed], [.dead], [.fenced]])
        #expect(rows[1].1.first?.error == "busy" && rows[1].1.first?.responseCode == 451)
    }

    @Test(
        "attempts recorded in one statement: fenced and logged as in a transaction, and only a recorded answer clears its endpoint's breaker"
    )
    func recordedInOneStatement() async throws {
        let (org, ids) = try await outbox(3)
        let endpoints = try await org.store { tx in
            try await ["a", "b"].asyncMap { name in
                let id = try await tx.createEndpoint(
                    channel: .webhook, format: .standard, name: name, url: "https://hooks.example/\(name)", eventTypes: [],
                    secret: WebhookSecret.generate().string
                ).id
                try await tx.query("UPDATE endpoints SET circuit_failures = 2, circuit_reason = 'timeouts' WHERE id = \(id)")
                return id
            }
        }
        let claims = try await claimAll(org, worker: "one").sorted {
            ids.firstIndex(of: $0.deliveryID)! < ids.firstIndex(of: $1.deliveryID)!
        }
        // The second row's lease moved on: its result (and the answer it carries) must be refused.
        _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET attempts = 2, lease_owner = 'other' WHERE id = \(ids[1])")
        }
        let recorded = try await env.workerDatabase.recordDeliveryAttempts(
            [
                RecordedAttempt(claim: claims[0], startedAt: Date(), result: .sent(responseCode: 200), answered: endpoints[0]),
                RecordedAttempt(claim: claims[1], startedAt: Date(), result: .sent(responseCode: 200), answered: endpoints[1]),
                RecordedAttempt(
                    claim: claims[2], startedAt: Date(),
                    result: .failed(responseCode: 451, error: "busy", retryAt: Date().addingTimeInterval(600))),
            ], organisation: org.id, worker: "one")
        #expect(recorded == [true, false, true])
        let rows = try await org.store { tx in try await ids.asyncMap { (try await tx.delivery($0), try await tx.deliveryAttempts($0)) } }
        #expect(rows.map(\.0.status) == [.sent, .sending, .failed])
        #expect(rows.map { $0.1.map(\.outcome) } == [[.sent], [.fenced], [.failed]])
        let breakers = try await org.store { tx in try await endpoints.asyncMap { try await tx.endpoint($0).circuit.failures } }
        #expect(breakers == [0, 2], "the recorded answer clears its endpoint's failures; the fenced one leaves them")
        // Another organisation's recording cannot clear this organisation's breaker, even when an
        // attempt of its own names this organisation's endpoint as the one that answered.
        let (other, otherIDs) = try await outbox(1)
        let theirs = try await claimAll(other, worker: "theirs")
        #expect(theirs.map(\.deliveryID) == otherIDs)
        let recordedThere = try await env.workerDatabase.recordDeliveryAttempts(
            [RecordedAttempt(claim: theirs[0], startedAt: Date(), result: .sent(responseCode: 200), answered: endpoints[1])],
            organisation: other.id, worker: "theirs")
        #expect(recordedThere == [true])
        #expect(try await org.store { tx in try await tx.endpoint(endpoints[1]).circuit.failures } == 2)
    }

    @Test("a worker whose lease expired cannot complete the row: the rescue logs the lost attempt, the fence refuses the late result")
    func fenceAndRescue() async throws {
        let (org, ids) = try await outbox(1)
        // A lease of a few seconds: long enough that a loaded machine cannot let it lapse before
        // the second claim, short enough to wait out.
        let first = try await env.workerDatabase.claimDeliveries(worker: "crashed", limit: 10, leaseSeconds: 4, organisation: org.id)
        #expect(first.map(\.deliveryID) == ids)
        let crashed = try #require(first.first)
        #expect(try await env.workerDatabase.claimDeliveries(worker: "other", limit: 10, leaseSeconds: 30, organisation: org.id).isEmpty)
        try await Task.sleep(for: .milliseconds(4500))
        // The lease expired: another worker's claim logs attempt 1 as EXPIRED and takes the row as attempt 2.
        let rescued = try await env.workerDatabase.claimDeliveries(worker: "rescuer", limit: 10, leaseSeconds: 30, organisation: org.id)
        #expect(rescued.map(\.attempt) == [2])
        let rescue = try #require(rescued.first)
        let rescuerDone = try await env.workerDatabase.withTenant(org.id) { tx in
            try await tx.completeDelivery(rescue, worker: "rescuer", startedAt: Date(), result: .sent(responseCode: 250))
        }
        // The crashed worker wakes up late and tries to complete attempt 1, and to extend its lease.
        let (lateDone, lateLease) = try await env.workerDatabase.withTenant(org.id) { tx in
            (
                try await tx.completeDelivery(
                    crashed, worker: "crashed", startedAt: Date(), result: .failed(responseCode: 500, error: "late", retryAt: Date())),
                try await tx.extendLeases(worker: "crashed", claims: first, leaseSeconds: 30)
            )
        }
        #expect(rescuerDone)
        #expect(!lateDone)
        #expect(lateLease == 0)
        let (delivery, attempts) = try await org.store { tx in (try await tx.delivery(ids[0]), try await tx.deliveryAttempts(ids[0])) }
        #expect(delivery.status == .sent)
        #expect(attempts.map(\.outcome) == [.expired, .sent])
    }

    @Test("a heartbeat skips a row another transaction holds instead of waiting for it, so it cannot deadlock with a completion")
    func heartbeatNeverWaits() async throws {
        let (org, ids) = try await outbox(3)
        let claims = try await claimAll(org, worker: "beating", lease: 30)
        #expect(Set(claims.map(\.deliveryID)) == Set(ids))
        let held = ids[0]
        // A completion of the first row is under way (its row locked, not committed) while the
        // heartbeat runs on another connection. Waiting for it would fail on the lock timeout.
        let extended = try await env.workerDatabase.withTenant(org.id) { holder in
            try await holder.query("SELECT 1 FROM deliveries WHERE id = \(held) FOR UPDATE")
            return try await env.workerDatabase.withTenant(org.id) { tx in
                try await tx.query("SET LOCAL lock_timeout = '5s'")
                return try await tx.extendLeases(worker: "beating", claims: claims, leaseSeconds: 600)
            }
        }
        #expect(extended == 2)
        let leases = try await org.store { tx in
            try await ids.asyncMap { id in
                try await tx.query("SELECT lease_expires_at > now() + interval '5 minutes' FROM deliveries WHERE id = \(id)")[0].decode(
                    Bool.self)
            }
        }
        #expect(leases == [false, true, true])
    }

    @Test("a transaction rolled back by a deadlock runs again from a clean start; other errors are not retried")
    func conflictsRunAgain() async throws {
        let org = try await TestOrganisation.make()
        var runs = 0
        let answer = try await env.database.withTenantRetryingConflicts(org.id) { tx in
            runs += 1
            _ = try await tx.createUser(NewUser(email: "once@retry.example", displayName: "Once"))
            if runs == 1 { try await tx.query("DO $$ BEGIN RAISE EXCEPTION 'lost to another' USING ERRCODE = '40P01'; END $$") }
            return runs
        }
        #expect(answer == 2)
        let users = try await org.store { tx in
            try await tx.query("SELECT count(*)::int FROM users WHERE email = 'once@retry.example'")[0].decode(Int.self)
        }
        #expect(users == 1)
        runs = 0
        await #expect(throws: PSQLError.self) {
            try await env.database.withTenantRetryingConflicts(org.id) { tx in
                runs += 1
                try await tx.query("DO $$ BEGIN RAISE EXCEPTION 'a fault' USING ERRCODE = 'P0001'; END $$")
            }
        }
        #expect(runs == 1)
    }

    @Test("a row whose worker keeps crashing goes DEAD at its last attempt instead of being claimed forever")
    func crashLoopGoesDead() async throws {
        let (org, ids) = try await outbox(1)
        _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET max_attempts = 2 WHERE id = \(ids[0])") }
        for _ in 0..<2 {
            _ = try await env.workerDatabase.claimDeliveries(worker: "crashy", limit: 10, leaseSeconds: 1, organisation: org.id)
            try await Task.sleep(for: .milliseconds(1200))
        }
        #expect(try await env.workerDatabase.claimDeliveries(worker: "next", limit: 10, leaseSeconds: 30, organisation: org.id).isEmpty)
        let (delivery, attempts) = try await org.store { tx in (try await tx.delivery(ids[0]), try await tx.deliveryAttempts(ids[0])) }
        #expect(delivery.status == .dead)
        #expect(attempts.map(\.outcome) == [.expired, .expired])
    }

    @Test("the API server's role cannot claim deliveries; the worker role cannot bypass the tenant policy")
    func claimIsWorkersOnly() async throws {
        let (org, _) = try await outbox(1)
        await #expect(throws: PSQLError.self) {
            _ = try await env.database.claimDeliveries(worker: "api", limit: 10, leaseSeconds: 30, organisation: org.id)
        }
        let rows = try await env.workerClient.query("SELECT count(*)::int FROM deliveries", logger: env.logger).collect()
        #expect(try rows[0].decode(Int.self) == 0)
        let role = try await env.workerClient.query(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user", logger: env.logger
        ).collect()
        #expect(try role[0].decode((Bool, Bool).self) == (false, false))
    }

    @Test("failures follow the retry schedule; the last attempt goes DEAD with every attempt logged")
    func retriesThenDead() async throws {
        let (org, ids) = try await outbox(1)
        // The row allows three attempts; the policy would allow eight: the row decides.
        _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET max_attempts = 3 WHERE id = \(ids[0])") }
        let policy = RetryPolicy(baseDelay: 60, factor: 2, maximumDelay: 3600, maximumAttempts: 8, jitter: 0)
        var retryTimes: [Date] = []
        for attempt in 1...3 {
            let claims = try await claimAll(org, worker: "w")
            let claim = try #require(claims.first)
            #expect(claim.attempt == attempt)
            let failedAt = Date()
            let next = try #require(policy.nextAttempt(after: claim.attempt, failedAt: failedAt, random: 0.5))
            _ = try await env.workerDatabase.withTenant(org.id) { tx in
                try await tx.completeDelivery(
                    claim, worker: "w", startedAt: failedAt, result: .failed(responseCode: 503, error: "unavailable", retryAt: next))
            }
            if attempt == 3 { break }
            retryTimes.append(next)
            // Scheduled on the policy's time and not claimable before it …
            let stored = try await org.store { tx in try await tx.delivery(ids[0]) }
            #expect(stored.status == .failed)
            #expect(abs(stored.nextAttemptAt.timeIntervalSince(next)) < 0.001)
            #expect(try await claimAll(org, worker: "early").isEmpty)
            // … and claimable once it comes (the test moves the clock of the row, not the test's).
            _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET next_attempt_at = now() WHERE id = \(ids[0])") }
        }
        let (delivery, attempts) = try await org.store { tx in (try await tx.delivery(ids[0]), try await tx.deliveryAttempts(ids[0])) }
        #expect(delivery.status == .dead)
        #expect(delivery.attempts == 3)
        #expect(attempts.map(\.outcome) == [.failed, .failed, .dead])
        #expect(attempts.allSatisfy { $0.responseCode == 503 })
        #expect(retryTimes.count == 2)
        // 60 s, then 120 s: exponential.
        #expect(abs(retryTimes[0].timeIntervalSince(attempts[0].startedAt) - 60) < 1)
        #expect(abs(retryTimes[1].timeIntervalSince(attempts[1].startedAt) - 120) < 1)
    }

    @Test(
        "the backlog's age counts a row given back unsent (its endpoint's circuit open) from when it first came due, until an attempt is recorded"
    )
    func backlogAgeAcrossGiveBacks() async throws {
        let (org, ids) = try await outbox(1)
        let stats = { try await org.store { tx in try await tx.outboxStats(now: Date()) } }
        // Counted from 50 s before `start`: at least 49 s, and at most that plus the time the test
        // has taken (many suites run at once in `make test`: one run took 40 s).
        let start = Date()
        let fromFirstDue = { (age: Double?) in age.map { $0 >= 49 && $0 <= 51 + Date().timeIntervalSince(start) } == true }
        // Due 50 s ago, claimed, and given back twice, each time due again a minute later.
        _ = try await org.store { tx in
            try await tx.query("UPDATE deliveries SET next_attempt_at = now() - interval '50 seconds' WHERE id = \(ids[0])")
        }
        #expect(fromFirstDue(try await stats().oldestPendingAge))
        for _ in 0..<2 {
            let claim = try #require(try await claimAll(org, worker: "busy").first)
            let given = try await org.store { tx in
                try await tx.releaseDeliveries([(claim, Date().addingTimeInterval(60))], worker: "busy")
            }
            #expect(given == [true])
            // Not due for a minute, and still counted from 50 s ago (the age said nothing before 0057).
            #expect(fromFirstDue(try await stats().oldestPendingAge))
            _ = try await org.store { tx in try await tx.query("UPDATE deliveries SET next_attempt_at = now() WHERE id = \(ids[0])") }
        }
        // An attempt recorded (a failure, retried in a minute): nothing waits any more.
        let claim = try #require(try await claimAll(org, worker: "busy").first)
        let recorded = try await org.store { tx in
            try await tx.completeDelivery(
                claim, worker: "busy", startedAt: Date(),
                result: .failed(responseCode: 503, error: "busy", retryAt: Date().addingTimeInterval(60)))
        }
        #expect(recorded)
        #expect(try await stats().oldestPendingAge == nil)
    }

    @Test("retry and cancel through the API, with their states checked")
    func retryAndCancelAPI() async throws {
        let (org, ids) = try await outbox(2)
        let app = try env.application()
        try await app.test(.router) { client in
            let retryPending = try await client.send(.post, "/v1/deliveries/\(ids[0])/retry", token: org.ownerToken)
            #expect(retryPending.isProblem(.conflict))
            #expect(
                retryPending.json["detail"] as? String == "Only a FAILED, DEAD or CANCELLED delivery can be retried; this one is PENDING.")
            let cancelled = try await client.send(.post, "/v1/deliveries/\(ids[0])/cancel", token: org.ownerToken)
            #expect(cancelled.json["status"] as? String == "CANCELLED")
            #expect(cancelled.json["last_error"] as? String == "Not sent: the delivery was cancelled.", "\(cancelled.text)")
            #expect(try await client.send(.post, "/v1/deliveries/\(ids[0])/cancel", token: org.ownerToken).isProblem(.conflict))
            let retried = try await client.send(.post, "/v1/deliveries/\(ids[0])/retry", token: org.ownerToken)
            #expect(retried.json["status"] as? String == "PENDING")
            let list = try await client.send(.get, "/v1/deliveries?status=PENDING&channel=email", token: org.ownerToken)
            #expect(Set((list.json["items"] as? [[String: Any]] ?? []).compactMap { $0["id"] as? String }) == Set(ids.map(\.lowercased)))
            let stats = try await client.send(.get, "/v1/deliveries/stats", token: org.ownerToken)
            #expect((stats.json["by_status"] as? [String: Int])?["PENDING"] == 2)
            #expect(stats.json["oldest_pending_age_seconds"] is Double)
            let one = try await client.send(.get, "/v1/deliveries/\(ids[0])", token: org.ownerToken)
            #expect(one.json["attempt_log"] is [Any])
            // The event cancelled: its cancelled delivery cannot be retried, and the answer says why.
            let event = try #require(one.json["event_id"] as? String)
            _ = try await client.send(.post, "/v1/events/\(event)/cancel", token: org.ownerToken)
            let byEvent = try await client.send(.get, "/v1/deliveries/\(ids[1])", token: org.ownerToken)
            #expect(byEvent.json["status"] as? String == "CANCELLED")
            #expect(byEvent.json["last_error"] as? String == "Not sent: the event was cancelled.", "\(byEvent.text)")
            let ofCancelled = try await client.send(.post, "/v1/deliveries/\(ids[0])/retry", token: org.ownerToken)
            #expect(ofCancelled.isProblem(.conflict))
            #expect(
                ofCancelled.json["detail"] as? String
                    == "This delivery's event was cancelled; a delivery of a cancelled event cannot be retried.",
                "\(ofCancelled.text)")
            #expect(try await client.send(.get, "/v1/deliveries", token: org.memberToken).isProblem(.forbidden))
        }
    }

    @Test("a bulk retry puts back what a filter matches, oldest first, a limit at a time; audited once a call")
    func retryManyAPI() async throws {
        let since = Date().addingTimeInterval(-5)
        let (org, ids) = try await outbox(5)
        let sorted = ids.sorted { $0.uuidString.lowercased() < $1.uuidString.lowercased() }
        // Four DEAD, one of them out of attempts; the fifth still PENDING.
        _ = try await org.store { tx in
            _ = try await tx.query(
                "UPDATE deliveries SET status = 'DEAD', attempts = 8, last_error = 'no answer' WHERE id = ANY(\(Array(sorted.prefix(4)))::uuid[])"
            )
            _ = try await tx.query("UPDATE deliveries SET attempts = 100 WHERE id = \(sorted[1])")
        }
        let stamp = ISO8601DateFormatter().string(from: since)
        let event = try await org.store { tx in try await tx.delivery(ids[0]).eventID.lowercased }
        let app = try env.application()
        try await app.test(.router) { client in
            func retry(_ body: String, token: String? = nil) async throws -> TestResponse {
                try await client.send(.post, "/v1/deliveries/retry", token: token ?? org.ownerToken, json: body)
            }
            // Filters that leave the DEAD emails out: another channel, another state, an empty
            // range, a later since.
            for body in [
                #"{"since": "\#(stamp)", "channel": "webhook"}"#, #"{"since": "\#(stamp)", "status": "FAILED"}"#,
                #"{"since": "\#(stamp)", "until": "\#(stamp)"}"#, #"{"since": "2999-01-01T00:00:00Z"}"#,
                #"{"since": "\#(stamp)", "event_id": "\#(UUID().uuidString)"}"#,
                #"{"since": "\#(stamp)", "user_id": "\#(UUID().uuidString)"}"#,
                #"{"since": "\#(stamp)", "endpoint_id": "\#(UUID().uuidString)"}"#,
            ] {
                let none = try await retry(body)
                #expect(
                    none.status == .ok && none.json["retried"] as? Int == 0 && none.json["more"] as? Bool == false, "\(body): \(none.text)")
            }
            let first = try await retry(#"{"since": "\#(stamp)", "limit": 2, "event_id": "\#(event)", "channel": "email"}"#)
            #expect(first.status == .ok && first.json["retried"] as? Int == 2 && first.json["more"] as? Bool == true, "\(first.text)")
            let second = try await retry(#"{"since": "\#(stamp)", "limit": 2}"#)
            #expect(second.json["retried"] as? Int == 1 && second.json["more"] as? Bool == false, "\(second.text)")
            // The row out of attempts is left, and counted.
            let third = try await retry(#"{"since": "\#(stamp)"}"#)
            #expect(
                third.json["retried"] as? Int == 0 && third.json["more"] as? Bool == false && third.json["skipped"] as? Int == 1,
                "\(third.text)")
            // Oldest first: the first call took the two oldest retryable rows.
            let states = try await org.store { tx in try await sorted.asyncMap { try await tx.delivery($0) } }
            #expect(states.map(\.status) == [.pending, .dead, .pending, .pending, .pending], "\(states.map(\.status))")
            #expect(states[0].maxAttempts == 9 && states[0].lastError == nil)
            // The limits, and who may.
            let zero = try await retry(#"{"since": "\#(stamp)", "limit": 0}"#)
            #expect(zero.isProblem(.unprocessableContent) && (zero.json["detail"] as? String ?? "").contains("limit"), "\(zero.text)")
            // A window that ends before it starts is a mistake, not an empty answer.
            let reversed = try await retry(#"{"since": "\#(stamp)", "until": "2000-01-01T00:00:00Z"}"#)
            #expect(
                reversed.isProblem(.unprocessableContent) && (reversed.json["detail"] as? String ?? "").contains("until"),
                "\(reversed.text)")
            let noSince = try await retry(#"{"limit": 5}"#)
            #expect(noSince.isProblem(.badRequest) || noSince.isProblem(.unprocessableContent), "\(noSince.text)")
            #expect((noSince.json["detail"] as? String ?? "").contains("since"), "\(noSince.text)")
            #expect(try await retry(#"{"since": "\#(stamp)"}"#, token: org.memberToken).isProblem(.forbidden))
            // Two calls changed something: two entries, with the count and the filter.
            let audit = try await client.send(.get, "/v1/audit-log?action=delivery.retry_many", token: org.ownerToken)
            let entries = audit.json["items"] as? [[String: Any]] ?? []
            #expect(entries.count == 2, "\(audit.text)")
            #expect(Set(entries.compactMap { ($0["after"] as? [String: Any])?["retried"] as? Int }) == [1, 2], "\(audit.text)")
        }
    }

    @Test("the deliveries list pages newest first, each delivery once; since leaves older ones out")
    func deliveriesNewestFirst() async throws {
        // setup: two events to the same three users, a moment apart
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let users = try await org.store { tx in
            try await (0..<3).asyncMap { i in try await tx.createUser(NewUser(email: "n\(i)@x.example", displayName: "N\(i)")).id }
        }
        func notify() async throws -> Set<String> {
            let (_, plan) = try await org.notify(
                EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: users), payload: .object([:])))
            return Set(plan.deliveries.map { $0.id.uuidString.lowercased() })
        }
        let older = try await notify()
        let between = Date()
        let newer = try await notify()
        let since: String = {
            let format = ISO8601DateFormatter()
            format.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            return format.string(from: between)
        }()
        let app = try env.application()
        try await app.test(.router) { client in
            // act: every page of two
            func list(_ query: String) async throws -> [String] {
                var ids: [String] = []
                var cursor: String?
                repeat {
                    let page = try await client.send(
                        .get, "/v1/deliveries?limit=2\(query)" + (cursor.map { "&cursor=\($0)" } ?? ""), token: org.ownerToken)
                    ids += (page.json["items"] as? [[String: Any]] ?? []).compactMap { $0["id"] as? String }
                    cursor = page.json["next_cursor"] as? String
                } while cursor != nil
                return ids
            }
            let all = try await list("")
            let recent = try await list("&since=\(since)")
            // check
            #expect(all.count == 6 && Set(all) == older.union(newer))
            #expect(all == all.sorted(by: >))
            #expect(Set(all.prefix(3)) == newer)
            #expect(recent.count == 3 && Set(recent) == newer)
        }
    }

    @Test("rolling back a notify leaves no delivery; a committed one is announced on NOTIFY")
    func rollbackAndNotify() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        struct Rollback: Error {}
        await #expect(throws: Rollback.self) {
            try await env.database.withTenant(org.id) { tx in
                let planned = try await tx.planEvent(
                    EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:])),
                    eventID: UUID(), now: Date())
                _ = try await tx.write(planned.event, type: planned.type, plan: planned.plan)
                throw Rollback()
            }
        }
        #expect(try await org.store { tx in try await tx.deliveries(DeliveryFilter(), limit: 10, after: nil).items.isEmpty })
        // A listener hears the committed event's id (a generous bound: the suite runs in parallel; other tests notify on the
        // same channel; only this organisation's announcement counts).
        let listener = PostgresClient(configuration: try .fromURL(env.appURL), backgroundLogger: env.logger)
        let heard = try await withThrowingTaskGroup(of: String?.self) { group in
            group.addTask {
                await listener.run(); return nil
            }
            let (listening, listeningSignal) = AsyncStream.makeStream(of: Void.self)
            group.addTask {
                try await listener.withConnection { connection in
                    let stream = try await connection.listen("herald_events")
                    listeningSignal.yield()
                    for try await notification in stream where notification.payload.hasPrefix(org.id.lowercased) {
                        return notification.payload
                    }
                    return nil
                }
            }
            group.addTask {
                for await _ in listening { break }
                let (event, _) = try await org.notify(
                    EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
                return "sent:\(event.id.lowercased)"
            }
            group.addTask {
                try await Task.sleep(for: .seconds(20)); return "timeout"
            }
            var results: [String] = []
            for try await result in group {
                if let result { results.append(result) }
                if results.contains(where: { $0.hasPrefix("sent:") }) && results.contains(where: { !$0.hasPrefix("sent:") }) { break }
            }
            group.cancelAll()
            return results
        }
        let sent = heard.first { $0.hasPrefix("sent:") }?.dropFirst(5)
        let payload = heard.first { !$0.hasPrefix("sent:") }
        #expect(payload != "timeout")
        // `d`: the event wrote deliveries, so outboxes wake (EventWork).
        #expect(payload == "\(org.id.lowercased):\(sent ?? ""):d")
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var result: [T] = []
        for element in self { result.append(try await transform(element)) }
        return result
    }
}
