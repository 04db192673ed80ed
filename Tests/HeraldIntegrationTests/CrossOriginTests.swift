import Foundation
import HTTPTypes
import HummingbirdTesting
import NIOHTTP1
import Testing

@testable import HeraldAPI

/// Pages of other origins calling the API (`HERALD_CORS_ORIGINS`): an integrator's web app on
/// its own origin reads its users' feed and stream from the browser.
@Suite("Cross-origin calls from browsers")
struct CrossOriginTests {
    @Test("the setting: *, a list of origins in the browser's form, or a clear refusal of anything else")
    func setting() throws {
        #expect(try CrossOriginPolicy(setting: "") == .none)
        #expect(try CrossOriginPolicy(setting: " , ") == .none)
        #expect(try CrossOriginPolicy(setting: "*") == CrossOriginPolicy(origins: .any))
        #expect(
            try CrossOriginPolicy(setting: "HTTPS://App.Example:443, http://localhost:5173")
                == CrossOriginPolicy(origins: .listed(["https://app.example", "http://localhost:5173"])))
        for bad in [
            "app.example", "https://app.example/", "https://app.example/feed", "ftp://app.example", "*, https://app.example", "https://",
        ] {
            #expect(throws: ConfigurationError.self, "\(bad)") { try CrossOriginPolicy(setting: bad) }
        }
        let error = try #require(throws: ConfigurationError.self) {
            try AppConfiguration.fromEnvironment(["HERALD_CORS_ORIGINS": "https://app.example/path"])
        }
        #expect(error.variable == "HERALD_CORS_ORIGINS")
    }

    @Test("a listed origin's preflight and calls are answered for it; another origin's preflight is a 403 naming the setting")
    func listedOrigin() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let policy = try CrossOriginPolicy(setting: "https://app.example")
        let app = try env.application(configure: { $0.crossOrigin = policy })
        try await app.test(.router) { client in
            let preflight = try await client.execute(
                uri: "/v1/me/notifications", method: .options,
                headers: [
                    .origin: "https://app.example", .accessControlRequestMethod: "GET",
                    .accessControlRequestHeaders: "authorization",
                ])
            #expect(preflight.status == .noContent)
            #expect(preflight.headers[.accessControlAllowOrigin] == "https://app.example")
            #expect(preflight.headers[.accessControlAllowMethods] == "DELETE, GET, HEAD")
            #expect(preflight.headers[.accessControlAllowHeaders]?.contains("Authorization") == true)
            #expect(preflight.headers[.vary] == "Origin")

            let markRead = try await client.execute(
                uri: "/v1/me/notifications/mark-read", method: .options,
                headers: [.origin: "https://app.example", .accessControlRequestMethod: "POST"])
            #expect(markRead.headers[.accessControlAllowMethods] == "POST")

            let other = try await client.execute(
                uri: "/v1/me/notifications", method: .options,
                headers: [.origin: "https://evil.example", .accessControlRequestMethod: "GET"])
            #expect(other.isProblem(.forbidden), "\(other.text)")
            #expect((other.json["detail"] as? String)?.contains("HERALD_CORS_ORIGINS") == true)
            #expect((other.json["detail"] as? String)?.contains("https://evil.example") == true)
            #expect(other.headers[.accessControlAllowOrigin] == nil)

            // The call itself, and a problem too: the page may read both.
            let feed = try await client.send(
                .get, "/v1/me/notifications", token: org.memberToken, headers: [.origin: "https://app.example"])
            #expect(feed.status == .ok)
            #expect(feed.headers[.accessControlAllowOrigin] == "https://app.example")
            #expect(feed.headers[.accessControlExposeHeaders]?.contains("X-Request-Id") == true)
            #expect(feed.headers[.accessControlAllowCredentials] == nil)
            let anonymous = try await client.send(.get, "/v1/me/notifications", headers: [.origin: "https://app.example"])
            #expect(anonymous.isProblem(.unauthorized))
            #expect(anonymous.headers[.accessControlAllowOrigin] == "https://app.example")
            let foreign = try await client.send(
                .get, "/v1/me/notifications", token: org.memberToken, headers: [.origin: "https://evil.example"])
            #expect(foreign.status == .ok)
            #expect(foreign.headers[.accessControlAllowOrigin] == nil)
            // A listed policy makes every /v1/ answer depend on Origin: caches must keep them apart.
            #expect(foreign.headers[.vary] == "Origin")
            #expect(try await client.send(.get, "/v1/me/notifications", token: org.memberToken).headers[.vary] == "Origin")

            // Outside /v1/ nothing answers across origins.
            let health = try await client.send(.get, "/healthz", headers: [.origin: "https://app.example"])
            #expect(health.status == .ok)
            #expect(health.headers[.accessControlAllowOrigin] == nil)
            let metricsPreflight = try await client.execute(
                uri: "/metrics", method: .options, headers: [.origin: "https://app.example", .accessControlRequestMethod: "GET"])
            #expect(metricsPreflight.status == .noContent && metricsPreflight.headers[.accessControlAllowOrigin] == nil)
        }
    }

    @Test("* answers every page, but not on the sign-in routes")
    func anyOrigin() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        let policy = try CrossOriginPolicy(setting: "*")
        try await env.application(configure: { $0.crossOrigin = policy }).test(.router) { client in
            let feed = try await client.send(
                .get, "/v1/me/notifications", token: org.memberToken, headers: [.origin: "https://any.example"])
            #expect(feed.headers[.accessControlAllowOrigin] == "*" && feed.headers[.vary] == nil)
            let preflight = try await client.execute(
                uri: "/v1/auth/token", method: .options, headers: [.origin: "https://any.example", .accessControlRequestMethod: "POST"])
            #expect(preflight.isProblem(.forbidden), "\(preflight.text)")
            let login = try await client.send(
                .post, "/v1/auth/token",
                json:
                    #"{"organisation": "\#(org.slug)", "email": "member@\#(org.slug).example", "password": "\#(TestOrganisation.password)"}"#,
                headers: [.origin: "https://any.example"])
            #expect(login.status == .ok)
            #expect(login.headers[.accessControlAllowOrigin] == nil)
        }
    }

    @Test("by default no origin: no CORS header; a preflight is any OPTIONS (204 with Allow), which the browser refuses")
    func noOrigins() async throws {
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        try await env.application().test(.router) { client in
            let preflight = try await client.execute(
                uri: "/v1/me/notifications", method: .options,
                headers: [.origin: "https://app.example", .accessControlRequestMethod: "GET"])
            #expect(preflight.status == .noContent && preflight.headers[.allow] == "DELETE, GET, HEAD, OPTIONS")
            #expect(preflight.headers[.accessControlAllowOrigin] == nil)
            let feed = try await client.send(
                .get, "/v1/me/notifications", token: org.memberToken, headers: [.origin: "https://app.example"])
            #expect(feed.status == .ok)
            #expect(feed.headers[.accessControlAllowOrigin] == nil)
        }
    }

    @Test(
        "in a real browser, a page of a listed origin reads the feed and follows the stream of another origin; a page of an unlisted one cannot",
        .enabled(if: Chromium.isInstalled, "chromium is not installed: scripts/install-deps.sh installs Debian's package"))
    func browser() async throws {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        let keys = try StreamServeProcess.keysDirectory()
        defer { try? FileManager.default.removeItem(atPath: keys) }
        // Pages of http://127.0.0.1:<port> may call; pages of http://localhost:<port> may not.
        // The two names reach the same server, and are two origins to the browser.
        let server = try await StreamServeProcess.start(keys: keys) { port in ["HERALD_CORS_ORIGINS": "http://127.0.0.1:\(port)"] }
        defer { server.kill() }
        let token = try await server.login("member@\(org.slug).example", of: org)
        let owner = try await server.login("owner@\(org.slug).example", of: org)
        let other = "http://localhost:\(server.port)"
        try await Chromium.withBrowser { browser in
            // A page of each origin: /healthz (the demo page's Content-Security-Policy allows no other origin).
            let listed = try await browser.open(server.url + "/healthz")
            let read = try await listed.evaluate(
                """
                fetch("\(other)/v1/me/notifications", {headers: {authorization: "Bearer \(token)"}})
                  .then(async r => `${r.status} ${r.headers.get("x-request-id") !== null} ${Array.isArray((await r.json()).items)}`)
                  .catch(e => `refused: ${e}`)
                """)
            #expect(read as? String == "200 true true")

            // A stream ticket (a POST with a JSON answer), then the stream itself.
            let opened = try await listed.evaluate(
                """
                (async () => {
                  const r = await fetch("\(other)/v1/me/stream-tickets", {method: "POST", headers: {authorization: "Bearer \(token)"}});
                  const ticket = await r.json();
                  window.created = [];
                  window.source = new EventSource("\(other)" + ticket.stream_url);
                  window.source.addEventListener("notification.created", e => window.created.push(JSON.parse(e.data).title));
                  return await new Promise(resolve => {
                    window.source.addEventListener("unread_count", e => resolve(`count ${JSON.parse(e.data).total}`));
                    window.source.onerror = () => resolve("stream refused");
                  });
                })()
                """)
            #expect(opened as? String == "count 0")
            let sent = try await server.send(
                .POST, "/v1/events", token: owner,
                json: """
                    {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]}, "payload": {"title": "Across origins"}}
                    """)
            #expect(sent.status == 202, "\(sent.text)")
            var titles: [String] = []
            let deadline = ContinuousClock.now + .seconds(10)
            while titles.isEmpty, ContinuousClock.now < deadline {
                titles = try await listed.evaluate("window.created") as? [String] ?? []
                if titles.isEmpty { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(titles == ["Across origins"])
            _ = try await listed.evaluate("window.source.close()")

            let unlisted = try await browser.open(other + "/healthz")
            let refused = try await unlisted.evaluate(
                """
                fetch("\(server.url)/v1/me/notifications", {headers: {authorization: "Bearer \(token)"}})
                  .then(r => `answered ${r.status}`).catch(e => e.name)
                """)
            #expect(refused as? String == "TypeError")
        }
    }
}
