import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// Per-organisation request rates (issue 12, fairness): past its rate an organisation gets a 429
/// problem with `Retry-After` and `RateLimit` headers before anything runs, other organisations
/// do not notice, and the bucket refills with time (an injected clock).
@Suite("Rate limits")
struct RateLimitTests {

    func task(_ org: TestOrganisation, _ title: String) -> String {
        #"{"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\#(org.memberID.lowercased)"]}, "payload": {"title": "\#(title)"}}"#
    }

    func events(_ org: TestOrganisation) async throws -> Int {
        try await org.store { tx in
            try await tx.query("SELECT count(*)::int FROM events WHERE organisation_id = \(org.id)").first!.decode(Int.self)
        }
    }

    @Test("past its events rate an organisation gets a 429 problem with RateLimit headers, writes nothing, and others go on")
    func eventsRate() async throws {
        let (org, other) = (try await TestOrganisation.make(), try await TestOrganisation.make())
        _ = try await TestCatalogue.make(in: org)
        _ = try await TestCatalogue.make(in: other)
        let clock = TestClock()
        let app = try await TestEnvironment.shared.rateLimited(events: 2, requests: 0, clock: clock)
        try await app.test(.router) { client in
            for remaining in [1, 0] {
                let sent = try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(org, "ok"))
                #expect(sent.status == .accepted, "\(sent.text)")
                #expect(sent.headers[HTTPField.Name("RateLimit-Policy")!] == #""events";q=2;w=1"#)
                #expect(sent.headers[HTTPField.Name("RateLimit")!]?.hasPrefix(#""events";r=\#(remaining);"#) == true)
            }
            let refused = try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(org, "too many"))
            #expect(refused.isProblem(.tooManyRequests), "\(refused.text)")
            #expect(refused.headers[.retryAfter] == "1")
            #expect(refused.headers[HTTPField.Name("RateLimit")!] == #""events";r=0;t=1"#)
            #expect((refused.json["detail"] as? String)?.contains("more than 2 events per second") == true, "\(refused.text)")
            #expect(try await events(org) == 2, "a refused notify writes nothing")

            // Reads are not events; another organisation has its own bucket.
            #expect(try await client.send(.get, "/v1/events", token: org.ownerToken).status == .ok)
            #expect(try await client.send(.post, "/v1/events", token: other.ownerToken, json: task(other, "theirs")).status == .accepted)

            // Half a second later the bucket has one more (two a second).
            clock.advance(0.5)
            #expect(try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(org, "later")).status == .accepted)
            #expect(try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(org, "again")).status == .tooManyRequests)
        }
    }

    @Test("the RateLimit headers describe the bucket: q its size, w the seconds it takes to refill, so r is never above q")
    func headersDescribeTheBucket() {
        let limiter = RateLimiter()
        let policy = RateLimitPolicy(name: "events", perSecond: 50, burst: 100)
        let first = limiter.take(UUID(), policy, now: Date())
        #expect(first.headers[HTTPField.Name("RateLimit-Policy")!] == #""events";q=100;w=2"#)
        #expect(first.headers[HTTPField.Name("RateLimit")!] == #""events";r=99;t=1"#)
        let slow = RateLimitPolicy(name: "requests", perSecond: 0.5, burst: 1)
        #expect(limiter.take(UUID(), slow, now: Date()).headers[HTTPField.Name("RateLimit-Policy")!] == #""requests";q=1;w=2"#)
        // The 429's detail says the rate as people write it ("1 event", not "1 events": a trial).
        #expect(RateLimitPolicy(name: "events", perSecond: 1, burst: 1).rateText(of: "event") == "1 event")
        #expect(slow.rateText(of: "request") == "0.5 requests")
        #expect(policy.rateText(of: "event") == "50 events")
    }

    @Test("an organisation's own limits, set with `herald organisation rate-limits`, replace the instance's")
    func organisationLimits() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let env = try await TestEnvironment.shared
        let shown = try await runHerald(
            ["organisation", "rate-limits", "--slug", org.slug, "--events-per-second", "0", "--requests-per-second", "3"],
            ["DATABASE_URL": env.appURL])
        #expect(shown.contains("events: no limit") && shown.contains("requests: 3 per second"), "\(shown)")
        #expect(
            try await org.store { tx in try await tx.rateLimitSettings() } == RateLimitSettings(requestsPerSecond: 3, eventsPerSecond: 0))
        let operators = try await org.store { tx in
            try await tx.query(
                "SELECT request_id FROM audit_log WHERE organisation_id = \(org.id) AND action = 'organisation.rate_limits'"
            ).map { try $0.decode(String.self) }
        }
        #expect(operators.first?.hasPrefix("cli herald organisation rate-limits by ") == true, "\(operators)")
        let refused = try await runHeraldExit(
            ["organisation", "rate-limits", "--slug", org.slug, "--events-per-second", "lots"], ["DATABASE_URL": env.appURL])
        #expect(refused.status != 0 && refused.output.contains("--events-per-second must be a number"), "\(refused.output)")
        // A negative value is a value, refused in words (not "Missing value").
        let negative = try await runHeraldExit(
            ["organisation", "rate-limits", "--slug", org.slug, "--events-per-second", "-5"], ["DATABASE_URL": env.appURL])
        #expect(negative.status != 0 && negative.output.contains("--events-per-second must be a number"), "\(negative.output)")

        let clock = TestClock()
        let app = try env.rateLimited(events: 1, requests: 1000, clock: clock)
        try await app.test(.router) { client in
            // Events: no limit of its own, although the instance's is 1 per second; requests: 3.
            for _ in 0..<3 {
                #expect(try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(org, "ok")).status == .accepted)
            }
            let refused = try await client.send(.get, "/v1/events", token: org.ownerToken)
            #expect(refused.isProblem(.tooManyRequests))
            #expect(refused.headers[HTTPField.Name("RateLimit-Policy")!] == #""requests";q=3;w=1"#)
            #expect((refused.json["detail"] as? String)?.contains("more than 3 requests per second") == true, "\(refused.text)")
        }
        // `default` goes back to the instance's, and says what that is where the command runs.
        let defaults = try await runHerald(
            ["organisation", "rate-limits", "--slug", org.slug, "--events-per-second", "default", "--requests-per-second", "default"],
            ["DATABASE_URL": env.appURL, "HERALD_RATE_LIMIT_REQUESTS": "500", "HERALD_RATE_LIMIT_EVENTS": "2.5"])
        #expect(
            defaults.contains("requests: the instance's default, HERALD_RATE_LIMIT_REQUESTS (500 per second where this command runs)")
                && defaults.contains("events: the instance's default, HERALD_RATE_LIMIT_EVENTS (2.5 per second where this command runs)"),
            "\(defaults)")
        #expect(try await org.store { tx in try await tx.rateLimitSettings() } == RateLimitSettings())
        // Each change is audited with what it replaced.
        let entry = try await org.store { tx in
            try await tx.query(
                "SELECT before::text FROM audit_log WHERE action = 'organisation.rate_limits' ORDER BY occurred_at DESC, id DESC LIMIT 1"
            ).first?.decode(String?.self)
        }
        #expect(entry?.contains("3") == true && entry?.contains("events_per_second") == true, "\(String(describing: entry))")
    }

    @Test("GET /v1/organisation shows the limits the organisation runs under and where each comes from")
    func limitsShown() async throws {
        let org = try await TestOrganisation.make()
        try await org.store { tx in try await tx.setRateLimits(RateLimitSettings(eventsPerSecond: 0)) }
        let app = try (try await TestEnvironment.shared).rateLimited(events: 1, requests: 1000, clock: TestClock())
        try await app.test(.router) { client in
            let shown = try await client.send(.get, "/v1/organisation", token: org.ownerToken)
            let limits = try #require(shown.json["rate_limits"] as? [String: Any], "\(shown.text)")
            #expect(limits["requests_per_second"] as? Double == 1000 && limits["requests_source"] as? String == "instance", "\(limits)")
            #expect(limits["events_per_second"] as? Double == 0 && limits["events_source"] as? String == "organisation", "\(limits)")
            #expect((limits["burst_seconds"] as? Double ?? 0) > 0, "\(limits)")
        }
    }

    @Test("over its rate, an organisation's real API key gets 429 and a forged one still gets 401: nobody spends another's rate")
    func forgedKeys() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let key = OpaqueToken(kind: .apiKey, organisationID: org.id)
        try await org.store { tx in
            _ = try await tx.createApiKey(
                id: key.id, name: "k", roleID: try await tx.builtinRole(.service).id, secretHash: key.secretHash, expiresAt: nil)
        }
        let forged = try #require(OpaqueToken(parsing: "hk.\(org.id.lowercased).\(key.id.lowercased).not-the-secret", kind: .apiKey))
        let clock = TestClock()
        let app = try await TestEnvironment.shared.rateLimited(requests: 2, clock: clock)
        try await app.test(.router) { (client: any TestClientProtocol) async throws in
            #expect(try await client.send(.get, "/v1/events", token: key.text).status == .ok)
            #expect(try await client.send(.get, "/v1/events", token: key.text).status == .ok)
            // The bucket is empty: the proven key is refused before the database...
            #expect(try await client.send(.get, "/v1/events", token: key.text).isProblem(.tooManyRequests))
            // ...and a forged key with the same id is still checked there first, and refused as such.
            #expect(try await client.send(.get, "/v1/events", token: forged.text).isProblem(.unauthorized))
            #expect(try await client.send(.get, "/v1/events", token: forged.text).isProblem(.unauthorized))
            clock.advance(0.5)
            #expect(try await client.send(.get, "/v1/events", token: key.text).status == .ok)
        }
    }
}
