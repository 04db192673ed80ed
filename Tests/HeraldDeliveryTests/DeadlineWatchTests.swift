import NIOCore
import NIOEmbedded
import Synchronization
import Testing

@testable import HeraldStore

/// The one timer behind every database and attempt deadline (issue 12), on an event loop whose
/// clock the test moves.
@Suite("Deadline watch")
struct DeadlineWatchTests {
    final class Expiries: Sendable {
        let names = Mutex<[String]>([])
        func record(_ name: String) -> @Sendable () -> Void { { self.names.withLock { $0.append(name) } } }
        var all: [String] { names.withLock { $0 } }
    }

    @Test("each deadline expires at its time, in order, unless cancelled; an earlier one added later still expires on time")
    func expiresOnTime() async throws {
        let loop = NIOAsyncTestingEventLoop()
        let watch = DeadlineWatch(on: loop)
        let expiries = Expiries()
        let start = loop.now
        _ = watch.watch(until: start + .seconds(30), expiries.record("30 s"))
        let cancelled = watch.watch(until: start + .seconds(20), expiries.record("20 s"))
        // Earlier than the armed timer (30 s): it must arm one of its own.
        _ = watch.watch(until: start + .seconds(10), expiries.record("10 s"))
        #expect(watch.watched == 3)

        await loop.advanceTime(to: start + .seconds(9))
        #expect(expiries.all.isEmpty)
        #expect(watch.cancel(cancelled))
        await loop.advanceTime(to: start + .seconds(10))
        #expect(expiries.all == ["10 s"])
        await loop.advanceTime(to: start + .seconds(29))
        #expect(expiries.all == ["10 s"])
        await loop.advanceTime(to: start + .seconds(31))
        #expect(expiries.all == ["10 s", "30 s"])
        #expect(watch.watched == 0)

        // A ticket that expired cannot be cancelled, and a deadline added after all that still expires.
        let late = watch.watch(until: start + .seconds(40), expiries.record("40 s"))
        await loop.advanceTime(to: start + .seconds(40))
        #expect(expiries.all == ["10 s", "30 s", "40 s"])
        #expect(!watch.cancel(late))
        await loop.shutdownGracefully()
    }

    @Test("a deadline later than the armed one expires after it, when the one timer is re-armed; so do those after a cancelled earliest")
    func rearms() async throws {
        let loop = NIOAsyncTestingEventLoop()
        let watch = DeadlineWatch(on: loop)
        let expiries = Expiries()
        let start = loop.now
        // Each later than the armed timer (10 s): none arms a timer of its own.
        _ = watch.watch(until: start + .seconds(10), expiries.record("10 s"))
        _ = watch.watch(until: start + .seconds(30), expiries.record("30 s"))
        _ = watch.watch(until: start + .seconds(50), expiries.record("50 s"))
        await loop.advanceTime(to: start + .seconds(10))
        #expect(expiries.all == ["10 s"])
        await loop.advanceTime(to: start + .seconds(30))
        #expect(expiries.all == ["10 s", "30 s"])

        // The earliest (the armed one) cancelled: the timer fires for nothing and re-arms.
        let earliest = watch.watch(until: start + .seconds(35), expiries.record("35 s"))
        _ = watch.watch(until: start + .seconds(60), expiries.record("60 s"))
        #expect(watch.cancel(earliest))
        await loop.advanceTime(to: start + .seconds(49))
        #expect(expiries.all == ["10 s", "30 s"])
        await loop.advanceTime(to: start + .seconds(50))
        #expect(expiries.all == ["10 s", "30 s", "50 s"])
        await loop.advanceTime(to: start + .seconds(60))
        #expect(expiries.all == ["10 s", "30 s", "50 s", "60 s"])
        #expect(watch.watched == 0)
        await loop.shutdownGracefully()
    }

    @Test("deadlines cancelled before they pass leave nothing behind, however many")
    func cancelledLeaveNothing() async throws {
        let loop = NIOAsyncTestingEventLoop()
        let watch = DeadlineWatch(on: loop)
        let expiries = Expiries()
        let tickets = (1...1000).map { watch.watch(until: loop.now + .seconds(Int64($0)), expiries.record("\($0)")) }
        for ticket in tickets { #expect(watch.cancel(ticket)) }
        #expect(watch.watched == 0)
        await loop.advanceTime(by: .seconds(2000))
        #expect(expiries.all.isEmpty)
        await loop.shutdownGracefully()
    }
}
