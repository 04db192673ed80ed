import Foundation
import HummingbirdWSClient
import Logging
import NIOCore
import Synchronization

/// Headless Chromium (Debian's `chromium`, installed by scripts/install-deps.sh) driven
/// through the DevTools protocol: one WebSocket to the browser, one flattened session per tab.
/// Just what the browser tests need: open a tab, evaluate JavaScript, take a screenshot.
enum Chromium {
    /// The browser, or nil when it is not installed (the browser tests are then skipped).
    static let executable: String? = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .first { FileManager.default.isExecutableFile(atPath: $0) }

    static var isInstalled: Bool { executable != nil }

    /// Runs `body` with a fresh headless browser (its own profile in a temporary directory),
    /// closed afterwards whatever happens.
    static func withBrowser<T>(_ body: (Browser) async throws -> T) async throws -> T {
        guard let executable else { throw BrowserError.notInstalled }
        let profile = FileManager.default.temporaryDirectory.appendingPathComponent("herald-chromium-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: profile, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: profile) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = [
            "--headless=new", "--no-sandbox", "--remote-debugging-port=0", "--user-data-dir=\(profile.path)",
            // WSClient sends this origin; DevTools refuses any origin it was not told about.
            "--remote-allow-origins=ws://127.0.0.1",
            // Every tab is a foreground tab: no throttled timers in the ones not "in front".
            "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-gpu",
            "--window-size=1000,700", "about:blank",
        ]
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        defer {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
        }
        let url = try await devToolsURL(from: stderr.fileHandleForReading)
        let connection = DevToolsConnection()
        let socket = Task { try await connection.run(url: url) }
        defer { socket.cancel() }
        let browser = Browser(connection: connection)
        do {
            let result = try await body(browser)
            _ = try? await connection.call("Browser.close")
            return result
        } catch {
            _ = try? await connection.call("Browser.close")
            throw error
        }
    }

    /// Reads the browser's stderr until it says where DevTools listens (`DevTools listening on
    /// ws://…`); keeps draining it afterwards so that the browser never blocks on a full pipe.
    private static func devToolsURL(from stderr: FileHandle) async throws -> String {
        let found = AsyncStream<String>.makeStream()
        let seen = Mutex<(text: String, found: Bool)>(("", false))
        stderr.readabilityHandler = { handle in
            let data = handle.availableData
            if data.isEmpty {
                handle.readabilityHandler = nil
                found.continuation.finish()
                return
            }
            let url: String? = seen.withLock { seen in
                guard !seen.found else { return nil }
                seen.text += String(decoding: data, as: UTF8.self)
                guard let range = seen.text.range(of: "DevTools listening on ") else { return nil }
                let rest = seen.text[range.upperBound...]
                guard let end = rest.firstIndex(of: "\n") else { return nil }
                seen.found = true
                return String(rest[..<end]).trimmingCharacters(in: .whitespaces)
            }
            if let url {
                found.continuation.yield(url)
                found.continuation.finish()
            }
        }
        let deadline = Task {
            try await Task.sleep(for: .seconds(30))
            found.continuation.finish()
        }
        defer { deadline.cancel() }
        for await url in found.stream { return url }
        throw BrowserError.noDevTools(seen.withLock { String($0.text.suffix(2000)) })
    }

    enum BrowserError: Error, CustomStringConvertible {
        case notInstalled
        case noDevTools(String)
        case protocolError(method: String, message: String)
        case javaScript(String)
        case closed

        var description: String {
            switch self {
            case .notInstalled: "chromium is not installed (scripts/install-deps.sh installs Debian's package)"
            case .noDevTools(let stderr): "chromium did not say where DevTools listens; its stderr:\n\(stderr)"
            case .protocolError(let method, let message): "DevTools \(method): \(message)"
            case .javaScript(let message): "JavaScript threw: \(message)"
            case .closed: "the DevTools connection closed"
            }
        }
    }

    /// The browser: opens tabs.
    struct Browser: Sendable {
        let connection: DevToolsConnection

        /// A new tab (its own `sessionStorage`) showing `url`, once its document has loaded.
        func open(_ url: String, width: Int = 1000, height: Int = 700) async throws -> Tab {
            let target = try await connection.call("Target.createTarget", ["url": "about:blank", "newWindow": true])
            guard let targetID = target["targetId"] as? String else { throw BrowserError.closed }
            let attached = try await connection.call("Target.attachToTarget", ["targetId": targetID, "flatten": true])
            guard let session = attached["sessionId"] as? String else { throw BrowserError.closed }
            let tab = Tab(connection: connection, session: session)
            try await tab.call(
                "Emulation.setDeviceMetricsOverride", ["width": width, "height": height, "deviceScaleFactor": 1, "mobile": false])
            try await tab.navigate(url)
            return tab
        }
    }

    /// One tab, through its DevTools session.
    struct Tab: Sendable {
        let connection: DevToolsConnection
        let session: String

        @discardableResult
        func call(_ method: String, _ parameters: [String: Any] = [:]) async throws -> [String: Any] {
            try await connection.call(method, parameters, session: session)
        }

        /// Loads `url` and waits until its document is complete.
        func navigate(_ url: String) async throws {
            try await call("Page.navigate", ["url": url])
            let deadline = ContinuousClock.now + .seconds(15)
            // Until the new document exists, the old one answers (or none does, mid-navigation).
            while (try? await evaluate("document.readyState === 'complete' && location.href")) as? String != url {
                guard ContinuousClock.now < deadline else { throw BrowserError.javaScript("\(url) did not finish loading") }
                try await Task.sleep(for: .milliseconds(50))
            }
        }

        /// The value of a JavaScript expression (awaited if it is a promise), as JSON gives it.
        func evaluate(_ expression: String) async throws -> Any? {
            let result = try await call("Runtime.evaluate", ["expression": expression, "returnByValue": true, "awaitPromise": true])
            if let exception = result["exceptionDetails"] as? [String: Any] {
                let description = (exception["exception"] as? [String: Any])?["description"] as? String
                throw BrowserError.javaScript(description ?? exception["text"] as? String ?? "\(exception)")
            }
            return (result["result"] as? [String: Any])?["value"]
        }

        /// The text of the first element matching `selector`, nil when there is none.
        func text(_ selector: String) async throws -> String? {
            try await evaluate("document.querySelector(\(Self.literal(selector)))?.textContent ?? null") as? String
        }

        /// Clicks the first element matching `selector` (as a user would: a trusted event is not
        /// needed by the page, so `click()` does).
        func click(_ selector: String) async throws {
            let clicked = try await evaluate(
                "(() => { const e = document.querySelector(\(Self.literal(selector))); if (!e) return false; e.click(); return true })()")
            guard clicked as? Bool == true else { throw BrowserError.javaScript("nothing matches \(selector)") }
        }

        /// Types `value` into the input matching `selector`.
        func fill(_ selector: String, _ value: String) async throws {
            let filled = try await evaluate(
                """
                (() => { const e = document.querySelector(\(Self.literal(selector))); if (!e) return false;
                  e.value = \(Self.literal(value)); e.dispatchEvent(new Event("input", { bubbles: true })); return true })()
                """)
            guard filled as? Bool == true else { throw BrowserError.javaScript("nothing matches \(selector)") }
        }

        /// The visible page as PNG; only its top `height` pixels when given.
        func screenshot(height: Int? = nil) async throws -> Data {
            var parameters: [String: Any] = ["format": "png"]
            if let height {
                let width = try await evaluate("window.innerWidth") as? Int ?? 1000
                parameters["clip"] = ["x": 0, "y": 0, "width": width, "height": height, "scale": 1]
            }
            let shot = try await call("Page.captureScreenshot", parameters)
            guard let base64 = shot["data"] as? String, let data = Data(base64Encoded: base64) else { throw BrowserError.closed }
            return data
        }

        /// A JavaScript string literal of `text`.
        static func literal(_ text: String) -> String {
            let data = try! JSONSerialization.data(withJSONObject: [text])
            return String(String(decoding: data, as: UTF8.self).dropFirst().dropLast())
        }
    }
}

/// One WebSocket to the browser's DevTools endpoint: commands carry an id and the answer
/// comes back with the same id; events (no id) are ignored.
final class DevToolsConnection: Sendable {
    private let outbound = AsyncStream<String>.makeStream()
    private let state = Mutex<State>(State())

    private struct State {
        var next = 0
        var waiting: [Int: CheckedContinuation<Data, any Error>] = [:]
        var closed = false
    }

    /// Connects and carries messages until the socket closes or the task is cancelled.
    func run(url: String) async throws {
        var configuration = WebSocketClientConfiguration()
        // Screenshots come back as one base64 message of a few megabytes.
        configuration.maxFrameSize = 1 << 26
        var logger = Logger(label: "herald.test.devtools")
        logger.logLevel = .error
        defer { fail(Chromium.BrowserError.closed) }
        try await WebSocketClient.connect(url: url, configuration: configuration, logger: logger) { inbound, writer, _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for await text in self.outbound.stream { try await writer.write(.text(text)) }
                }
                for try await message in inbound.messages(maxSize: 1 << 26) {
                    if case .text(let text) = message { self.received(text) }
                }
                group.cancelAll()
            }
        }
    }

    /// Sends one command and returns its `result`.
    func call(_ method: String, _ parameters: [String: Any] = [:], session: String? = nil) async throws -> [String: Any] {
        var message: [String: Any] = ["method": method, "params": parameters]
        if let session { message["sessionId"] = session }
        let data = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Data, any Error>) in
            let id: Int? = state.withLock { state in
                guard !state.closed else { return nil }
                state.next += 1
                state.waiting[state.next] = continuation
                return state.next
            }
            guard let id else { return continuation.resume(throwing: Chromium.BrowserError.closed) }
            message["id"] = id
            do {
                let text = String(decoding: try JSONSerialization.data(withJSONObject: message), as: UTF8.self)
                outbound.continuation.yield(text)
            } catch {
                state.withLock { _ = $0.waiting.removeValue(forKey: id) }
                continuation.resume(throwing: error)
            }
        }
        guard let answer = try JSONSerialization.jsonObject(with: data) as? [String: Any] else { return [:] }
        if let error = answer["error"] as? [String: Any] {
            throw Chromium.BrowserError.protocolError(method: method, message: error["message"] as? String ?? "\(error)")
        }
        return answer["result"] as? [String: Any] ?? [:]
    }

    private func received(_ text: String) {
        let data = Data(text.utf8)
        guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let id = object["id"] as? Int else {
            return
        }
        state.withLock { $0.waiting.removeValue(forKey: id) }?.resume(returning: data)
    }

    private func fail(_ error: any Error) {
        let waiting = state.withLock { state in
            state.closed = true
            defer { state.waiting.removeAll() }
            return Array(state.waiting.values)
        }
        for continuation in waiting { continuation.resume(throwing: error) }
        outbound.continuation.finish()
    }
}
