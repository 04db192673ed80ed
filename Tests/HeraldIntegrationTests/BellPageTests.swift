import Foundation
import HTTPTypes
import HummingbirdTesting
import NIOHTTP1
import Testing

@testable import HeraldAPI

/// The bell page (`GET /demo/bell`, issue 10) in a real browser: headless Chromium, two tabs
/// signed in as the same user, against a `herald serve` process. What a clinic's acceptance
/// case asks: the unread badge follows new notifications and reads in other tabs without a
/// reload, and the page comes back by itself after the server goes away.
@Suite("The bell page in a real browser")
struct BellPageTests {
    typealias Tab = Chromium.Tab

    @Test(
        "two tabs: an event raises both badges within 2 s, a read in one lowers the other, and after a server restart both catch up",
        .enabled(if: Chromium.isInstalled, "chromium is not installed: scripts/install-deps.sh installs Debian's package"))
    func twoTabs() async throws {
        // setup
        let env = try await TestEnvironment.shared
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        // `herald serve` as a process of its own, so that "the server dies" is a real death
        // (SIGKILL: the kernel cuts every connection, nothing says goodbye).
        let keys = try StreamServeProcess.keysDirectory()
        // The private key goes with the test (deferred first, so removed after the servers stop).
        defer { try? FileManager.default.removeItem(atPath: keys) }
        var server = try await StreamServeProcess.start(keys: keys)
        defer { server.kill() }
        let port = server.port
        let owner = try await server.login("owner@\(org.slug).example", of: org)
        try await Chromium.withBrowser { browser in
            let tabs = [
                try await browser.open(server.url + "/demo/bell"),
                try await browser.open(server.url + "/demo/bell"),
            ]
            for tab in tabs {
                try await signIn(tab, as: "member@\(org.slug).example", of: org)
                // Set once: still there at the end means no tab was reloaded.
                _ = try await tab.evaluate("window.sameDocument = true")
            }
            let signedIn = try await poll(until: ["connected", "connected"], within: .seconds(30)) { try await statuses(tabs) }
            #expect(signedIn == ["connected", "connected"])
            #expect(try await badges(tabs) == ["0", "0"])

            // act: a notification for the user, through the API
            let sent = try await server.send(.POST, "/v1/events", token: owner, json: task(for: org, "Review the implant plan"))
            #expect(sent.status == 202, "\(sent.text)")

            // check: both badges within 2 s, and the row listed unread
            let raised = try await poll(until: ["1", "1"], within: .seconds(2)) { try await badges(tabs) }
            #expect(raised == ["1", "1"])
            let listed = ["Review the implant plan:false"]
            for tab in tabs {
                let listedRows = try await poll(until: listed, within: .seconds(2)) { try await rows(tab) }
                #expect(listedRows == listed)
            }

            // act: read in the first tab
            try await tabs[0].click("#feed li[data-read='false'] button.mark-read")

            // check: the second tab's badge goes down and its row shows read, within 2 s
            let lowered = try await poll(until: "0", within: .seconds(2)) { try await tabs[1].text("#badge") }
            #expect(lowered == "0")
            let read = ["Review the implant plan:true"]
            let readRows = try await poll(until: read, within: .seconds(2)) { try await rows(tabs[1]) }
            #expect(readRows == read)
            #expect(try await tabs[0].text("#badge") == "0")

            // act: the server dies (every stream cut, no goodbye); a notification is sent
            // through another instance's API while it is down; then it comes back
            server.kill()
            let away = ["reconnecting", "reconnecting"]
            let cut = try await poll(until: away, within: .seconds(5)) { try await statuses(tabs) }
            let cutEvents = try await tabs[0].evaluate("window.bellEvents") as? [String] ?? []
            #expect(cut == away, "events the first tab received: \(cutEvents)")
            let meanwhile = try await env.application().test(.router) { client in
                try await client.send(.post, "/v1/events", token: org.ownerToken, json: task(for: org, "Sent while you were away"))
            }
            #expect(meanwhile.status == .accepted, "\(meanwhile.text)")
            server = try StreamServeProcess(port: port, keys: keys)
            try await server.waitUntilReady()

            // check: each tab reconnects by itself and replays what it missed, once
            let back = ["connected", "connected", "1", "1"]
            let resumed = try await poll(until: back, within: .seconds(10)) { try await statuses(tabs) + badges(tabs) }
            #expect(resumed == back)
            let caughtUp = ["Sent while you were away:false", "Review the implant plan:true"]
            for tab in tabs {
                let replayed = try await poll(until: caughtUp, within: .seconds(2)) { try await rows(tab) }
                let events = try await tab.evaluate("window.bellEvents") as? [String] ?? []
                #expect(replayed == caughtUp, "events the tab received: \(events)")
                // Caught up by replay from its last event, not by reading the list again.
                let reconnect = events.last { $0.hasPrefix("connect ") }
                #expect(reconnect?.hasPrefix("connect since=") == true && reconnect != "connect since=now", "\(events)")
                #expect(try await tab.evaluate("window.sameDocument") as? Bool == true, "the tab was reloaded")
            }

            // The picture for docs/realtime.md: a critical alert on top of the two tasks.
            let ownerAgain = try await server.login("owner@\(org.slug).example", of: org)
            let alert = try await server.send(.POST, "/v1/events", token: ownerAgain, json: reading(for: org))
            #expect(alert.status == 202, "\(alert.text)")
            let alerted = try await poll(until: "2", within: .seconds(10)) { try await tabs[0].text("#badge") }
            #expect(alerted == "2")
            try await screenshot(tabs[0])
        }
    }

    // MARK: - The page, as a user sees it

    /// Reads `value` every 100 ms until it is `expected` or `timeout` has passed; the last
    /// reading. (What the page shows is polled, never waited for with a fixed sleep.)
    func poll<Value: Equatable>(until expected: Value, within timeout: Duration, _ value: () async throws -> Value) async throws -> Value {
        let deadline = ContinuousClock.now + timeout
        while true {
            let seen = try await value()
            if seen == expected || ContinuousClock.now >= deadline { return seen }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    func signIn(_ tab: Tab, as email: String, of org: TestOrganisation) async throws {
        try await tab.fill("#org", org.slug)
        try await tab.fill("#email", email)
        try await tab.fill("#password", TestOrganisation.password)
        _ = try await tab.evaluate("document.querySelector('#signin-form').requestSubmit()")
    }

    func badges(_ tabs: [Tab]) async throws -> [String?] {
        var badges: [String?] = []
        for tab in tabs { badges.append(try await tab.text("#badge")) }
        return badges
    }

    func statuses(_ tabs: [Tab]) async throws -> [String?] {
        var statuses: [String?] = []
        for tab in tabs { statuses.append(try await tab.text("#status")) }
        return statuses
    }

    /// The listed rows, top to bottom, as `title:read`.
    func rows(_ tab: Tab) async throws -> [String] {
        let rows = try await tab.evaluate(
            """
            [...document.querySelectorAll("#feed li[data-id]")].map((li) =>
              li.querySelector(".title").lastChild.textContent + ":" + li.dataset.read)
            """)
        return rows as? [String] ?? []
    }

    /// Saves the tab as PNG: to docs/images/bell.png with HERALD_UPDATE_SCREENSHOTS=1 (so that
    /// `make test` leaves the tree clean), else to a temporary file.
    func screenshot(_ tab: Tab) async throws {
        // Down to the end of the list, and a margin.
        let bottom = try await tab.evaluate("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom) + 24") as? Int
        let png = try await tab.screenshot(height: bottom)
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47]), "not a PNG")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let destination =
            ProcessInfo.processInfo.environment["HERALD_UPDATE_SCREENSHOTS"] == "1"
            ? root.appendingPathComponent("docs/images/bell.png")
            : FileManager.default.temporaryDirectory.appendingPathComponent("herald-bell.png")
        try FileManager.default.createDirectory(at: destination.deletingLastPathComponent(), withIntermediateDirectories: true)
        try png.write(to: destination)
    }

    // MARK: - Events

    func task(for org: TestOrganisation, _ title: String) -> String {
        """
        {"type": "TASK_ASSIGNED", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]}, "payload": {"title": "\(title)"}}
        """
    }

    func reading(for org: TestOrganisation) -> String {
        """
        {"type": "ISQ_CRITICAL", "audience": {"user_ids": ["\(org.memberID.uuidString.lowercased())"]},
         "payload": {"isq": 25, "threshold": 55, "implant": "IMP-19"}, "subject": {"type": "implant", "id": "IMP-19"}}
        """
    }
}
