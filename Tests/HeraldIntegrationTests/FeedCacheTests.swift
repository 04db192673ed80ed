import Foundation
import HTTPTypes
import HeraldCore
import NIOHTTP1
import PostgresNIO
import Synchronization
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// The bell's reads kept per user (`FeedCache`, issue 12): served again while nothing says the
/// feed changed, dropped at once by this instance's own writes and by the bus (another
/// instance's writes, notify through any path, a deactivation), and never older than the
/// lifetime by the injected clock. Real servers on ports, each with its own bus, as in
/// `StreamTests`; the clock stands still unless a test moves it, so a fresh answer is never the
/// lifetime's doing unless the test says so.
@Suite("Feed cache")
struct FeedCacheTests {
    /// Two minutes ahead: rows notified during the test (at the real time) are visible by it.
    static func clock() -> TestClock { TestClock(Date().addingTimeInterval(120)) }

    func organisation() async throws -> TestOrganisation {
        let org = try await TestOrganisation.make()
        _ = try await TestCatalogue.make(in: org)
        return org
    }

    func task(_ org: TestOrganisation, _ title: String) async throws {
        try await org.notify(
            EventRequest(typeKey: "TASK_ASSIGNED", audience: Audience(userIDs: [org.memberID]), payload: .object(["title": .string(title)]))
        )
    }

    /// The first page's items (title, read, category) and the unread total, as the server answers.
    func bell(_ server: StreamServer, _ org: TestOrganisation) async throws -> (items: [[String: Any]], unread: Int) {
        let (pageStatus, page) = try await server.send(.GET, "/v1/me/notifications?limit=20", token: org.memberToken)
        #expect(pageStatus == 200, "\(page)")
        let (countStatus, count) = try await server.send(.GET, "/v1/me/notifications/unread-count", token: org.memberToken)
        #expect(countStatus == 200, "\(count)")
        return (json(page)["items"] as? [[String: Any]] ?? [], json(count)["total"] as? Int ?? -1)
    }

    /// Polls `server` until `done` holds for the bell (real time, at most 10 s).
    func eventually(
        _ server: StreamServer, _ org: TestOrganisation, what: String, _ done: ([[String: Any]], Int) -> Bool
    ) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while true {
            let (items, unread) = try await bell(server, org)
            if done(items, unread) { return }
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: what) }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Waits until the bus has brought `server` every message about the member's rows so far:
    /// the sweep has numbered them (its message is on `herald_stream`), then a marker sent on the
    /// same channel after it has dropped an entry kept for the purpose.
    func settle(_ server: StreamServer, _ org: TestOrganisation) async throws {
        let cache = try #require(server.cache)
        let deadline = ContinuousClock.now + .seconds(30)
        while try await org.store({ tx in
            try await tx.query("SELECT count(*)::int FROM feed_due WHERE organisation_id = \(org.id) AND user_id = \(org.memberID)")
                .first!.decode(Int.self)
        }) > 0 {
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "the sweep") }
            try await Task.sleep(for: .milliseconds(20))
        }
        let marker = FeedCache.Key(organisationID: org.id, userID: org.ownerID, target: "marker")
        if case .read(let ticket, _) = await cache.begin(marker) {
            cache.finish(marker, ticket: ticket, response: (HTTPResponse(status: .ok), []))
        }
        #expect(await kept(cache, marker) != nil)
        let payload = #"{"org": "\#(org.id.lowercased)", "users": ["\#(org.ownerID.lowercased)"]}"#
        _ = try await org.store { tx in try await tx.query("SELECT pg_notify('herald_stream', \(payload))") }
        while await kept(cache, marker) != nil {
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "the marker on the bus") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    @Test("a read is served again until the lifetime passes; what no message announces shows then")
    func servedUntilLifetime() async throws {
        let org = try await organisation()
        let clock = Self.clock()
        try await StreamServer.with(now: { clock.now() }, feedCacheSeconds: 5) { servers in
            let server = servers[0]
            try await task(org, "first")
            try await eventually(server, org, what: "the first row") { items, _ in items.count == 1 }
            try await settle(server, org)
            let before = try await bell(server, org)
            #expect(before.items.first?["category"] as? String == "activity")
            // A catalogue change made in SQL, through no instance: no message says the feed changed.
            _ = try await org.store { tx in
                try await tx.query("UPDATE categories SET key = 'chores' WHERE organisation_id = \(org.id) AND key = 'activity'")
            }
            clock.advance(4)
            #expect(try await bell(server, org).items.first?["category"] as? String == "activity")
            clock.advance(1.5)
            #expect(try await bell(server, org).items.first?["category"] as? String == "chores")
        }
    }

    @Test("this instance's own writes show at once in the next read of the page and the count")
    func ownWrites() async throws {
        let org = try await organisation()
        let clock = Self.clock()
        try await StreamServer.with(now: { clock.now() }, feedCacheSeconds: 60) { servers in
            let server = servers[0]
            try await task(org, "one")
            try await task(org, "two")
            try await eventually(server, org, what: "two unread rows") { items, unread in items.count == 2 && unread == 2 }
            // The sweep's message about the two rows (which drops the member's entries) is in.
            try await settle(server, org)
            let id = try #require(try await bell(server, org).items.first?["id"] as? String)
            // Kept: the same reads again are answered from the cache.
            let hits = try #require(server.cache).counts.withLock { $0.hits }
            _ = try await bell(server, org)
            #expect(try #require(server.cache).counts.withLock { $0.hits } == hits + 2)
            #expect(try await server.send(.POST, "/v1/me/notifications/\(id)/read", token: org.memberToken).status == 200)
            let after = try await bell(server, org)
            #expect(after.unread == 1)
            #expect(after.items.first { $0["id"] as? String == id }?["read"] as? Bool == true)
            #expect(
                try await server.send(.POST, "/v1/me/notifications/mark-read", token: org.memberToken, json: #"{"all": true}"#).status
                    == 200)
            #expect(try await bell(server, org).unread == 0)
            // A command on the live feed's socket is a write of this instance too.
            let socket = try await StreamProbe.open(.socket, on: server, token: org.memberToken)
            try await socket.next("unread_count")
            socket.send(#"{"command": "mark_unread", "id": "\#(id)", "ref": "c1"}"#)
            try await socket.next("ack")
            #expect(try await bell(server, org).unread == 1)
        }
    }

    @Test("a kept answer is its user's own: other users and organisations asking the same path get theirs; the token is still checked")
    func perUser() async throws {
        let (org, other) = (try await organisation(), try await organisation())
        try await StreamServer.with(feedCacheSeconds: 60) { servers in
            let server = servers[0]
            try await task(org, "for the member")
            try await eventually(server, org, what: "the member's row") { items, unread in items.count == 1 && unread == 1 }
            _ = try await bell(server, org)
            let path = "/v1/me/notifications?limit=20"
            for token in [org.ownerToken, other.memberToken, other.ownerToken] {
                for _ in 0..<2 {
                    let (status, text) = try await server.send(.GET, path, token: token)
                    #expect(status == 200 && (json(text)["items"] as? [Any])?.isEmpty == true, "\(text)")
                }
            }
            let env = try await TestEnvironment.shared
            let expired = try await env.tokens.issueAccessToken(
                organisationID: org.id, userID: org.memberID, now: Date().addingTimeInterval(-7200))
            #expect(try await server.send(.GET, path, token: expired).status == 401)
            #expect(try await server.send(.GET, path, token: org.memberToken + "x").status == 401)
            // Another user's own writes (a stream ticket, a preference) leave the member's answers kept.
            try await settle(server, org)
            _ = try await server.send(.GET, path, token: org.memberToken)
            let kept = try #require(server.cache).counts.withLock { $0.hits }
            #expect(try await server.send(.POST, "/v1/me/stream-tickets", token: org.ownerToken).status == 201)
            _ = try await server.send(.GET, path, token: org.memberToken)
            #expect(try #require(server.cache).counts.withLock { $0.hits } == kept + 1)
            // Searches, filters and cursors are not kept: each goes to the database.
            let reads = try #require(server.cache).counts.withLock { $0.reads }
            for _ in 0..<2 { _ = try await server.send(.GET, "/v1/me/notifications?limit=20&read=false", token: org.memberToken) }
            #expect(try #require(server.cache).counts.withLock { $0.reads } == reads)
        }
    }

    @Test("another instance's writes, a notify through the store and a deactivation reach the cache through the bus")
    func otherInstances() async throws {
        let (org, other) = (try await organisation(), try await organisation())
        let clock = Self.clock()
        try await StreamServer.with(count: 2, now: { clock.now() }, feedCacheSeconds: 300) { servers in
            let (cached, writer) = (servers[0], servers[1])
            try await task(org, "one")
            try await eventually(cached, org, what: "the first row") { items, unread in items.count == 1 && unread == 1 }
            let id = try #require(try await bell(cached, org).items.first?["id"] as? String)
            try await task(other, "elsewhere")
            #expect(try await writer.send(.POST, "/v1/me/notifications/\(id)/read", token: org.memberToken).status == 200)
            try await eventually(cached, org, what: "the read made through the other instance") { items, unread in
                unread == 0 && items.first?["read"] as? Bool == true
            }
            try await task(org, "two")
            try await eventually(cached, org, what: "the row notified through the store") { items, unread in
                items.count == 2 && unread == 1
            }
            // Deactivated through the other instance: refused here too, cache or not.
            let deactivated = try await writer.send(.POST, "/v1/users/\(org.memberID.lowercased)/deactivate", token: org.ownerToken)
            #expect(deactivated.status == 200, "\(deactivated.text)")
            let deadline = ContinuousClock.now + .seconds(10)
            while try await cached.send(.GET, "/v1/me/notifications?limit=20", token: org.memberToken).status != 401 {
                guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "the deactivated user's refusal") }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
    }

    /// What the cache answers for `key` now: the kept body, or nil (the read it asks for is
    /// ended at once, kept nowhere).
    func kept(_ cache: FeedCache, _ key: FeedCache.Key) async -> String? {
        switch await cache.begin(key) {
        case .hit(let entry): return String(decoding: entry.body, as: UTF8.self)
        case .read(let ticket, _):
            cache.finish(key, ticket: ticket, response: nil)
            return nil
        }
    }

    /// Ends the read `begin` asks for `key` with `body`; false if it was a hit.
    func read(_ cache: FeedCache, _ key: FeedCache.Key, then: () -> Void = {}, answer body: String) async -> Bool {
        guard case .read(let ticket, _) = await cache.begin(key) else { return false }
        then()
        cache.finish(key, ticket: ticket, response: (HTTPResponse(status: .ok), Array(body.utf8)))
        return true
    }

    /// Waits (real time, at most 10 s) until `count` requests wait for the read under way.
    func waitForWaiters(_ cache: FeedCache, _ key: FeedCache.Key, _ count: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while cache.waiting(for: key) < count {
            guard ContinuousClock.now < deadline else { throw StreamTestTimeout(what: "\(count) waiting requests") }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    @Test("a read that started before an invalidation is not kept; misses of a read under way wait for it")
    func readsRacingInvalidations() async throws {
        let org = try await organisation()
        try await StreamServer.with(feedCacheSeconds: 60) { servers in
            let cache = try #require(servers[0].cache)
            let key = FeedCache.Key(organisationID: org.id, userID: org.memberID, target: "/v1/me/notifications")
            // Invalidated while reading: not kept.
            #expect(await read(cache, key, then: { cache.invalidate(organisationID: org.id, users: [org.memberID]) }, answer: "old"))
            #expect(await kept(cache, key) == nil)
            // Another user's invalidation does not concern it.
            #expect(await read(cache, key, then: { cache.invalidate(organisationID: org.id, users: [org.ownerID]) }, answer: "new"))
            #expect(await kept(cache, key) == "new")
            // The organisation's drops it, and a read under way when it came.
            cache.invalidate(organisationID: org.id)
            #expect(await read(cache, key, then: { cache.invalidate(organisationID: org.id) }, answer: "stale"))
            #expect(await kept(cache, key) == nil)
            // Requests that miss while a read is under way wait for it and get its answer.
            guard case .read(let ticket, let leads) = await cache.begin(key) else {
                Issue.record("a hit after an invalidation")
                return
            }
            #expect(leads)
            async let first = cache.begin(key)
            async let second = cache.begin(key)
            try await waitForWaiters(cache, key, 2)
            cache.finish(key, ticket: ticket, response: (HTTPResponse(status: .ok), Array("shared".utf8)))
            for answer in await [first, second] {
                guard case .hit(let entry) = answer else {
                    Issue.record("a waiting request read for itself")
                    continue
                }
                #expect(entry.body == Array("shared".utf8))
            }
            // Invalidated while they wait: they read for themselves, and nothing is kept.
            cache.apply(.feedChanged(organisationID: org.id, userID: org.memberID, kind: .read))
            guard case .read(let again, _) = await cache.begin(key) else {
                Issue.record("a hit after an invalidation")
                return
            }
            async let waiter = cache.begin(key)
            try await waitForWaiters(cache, key, 1)
            cache.apply(.streamsAdvanced(organisationID: org.id, userIDs: [org.memberID]))
            cache.finish(key, ticket: again, response: (HTTPResponse(status: .ok), Array("before".utf8)))
            guard case .read(let own, let ownLeads) = await waiter else {
                Issue.record("a waiting request got an answer read before an invalidation")
                return
            }
            #expect(!ownLeads)
            cache.finish(key, ticket: own, response: (HTTPResponse(status: .ok), Array("after".utf8)))
            #expect(await kept(cache, key) == "after")
            // Missed messages drop everything.
            cache.apply(.missedMessages)
            #expect(await kept(cache, key) == nil)
        }
    }
}
