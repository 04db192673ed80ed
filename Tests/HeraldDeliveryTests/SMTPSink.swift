import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A real SMTP server for tests: aiosmtpd's Controller in a python3 child process that
/// stores each accepted message as `NNN.eml` (raw DATA bytes) plus `NNN.json` (envelope and
/// client port) in a temporary directory. Recipients starting with "reject" get a 550.
/// SMTPUTF8 (RFC 6531) is offered only when asked for, as with many real servers.
final class SMTPSink {
    let port: Int
    let directory: URL
    private let process: Process
    private let stdin: Pipe

    private static let script = #"""
        import json, os, socket, sys
        from aiosmtpd.controller import Controller

        out_dir = sys.argv[1]
        smtputf8 = sys.argv[2] == "1"

        class Handler:
            count = 0

            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if address.startswith("reject"):
                    return "550 5.1.1 <%s>: Recipient address rejected" % address
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                Handler.count += 1
                base = os.path.join(out_dir, "%03d" % Handler.count)
                with open(base + ".eml", "wb") as f:
                    f.write(envelope.original_content)
                with open(base + ".json", "w") as f:
                    json.dump({"clientPort": session.peer[1], "mailFrom": envelope.mail_from,
                               "rcptTos": envelope.rcpt_tos, "mailOptions": envelope.mail_options}, f)
                return "250 2.0.0 Ok: queued as %d" % Handler.count

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        controller = Controller(Handler(), hostname="127.0.0.1", port=port, server_hostname="sink.test",
                                enable_SMTPUTF8=smtputf8)
        controller.start()
        print("READY", port, flush=True)
        sys.stdin.read()  # serve until the test closes stdin (or exits)
        controller.stop()
        """#

    /// Starts the server and waits until it listens; `smtputf8` makes it offer SMTPUTF8.
    init(smtputf8: Bool = false) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("smtp-sink-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", Self.script, directory.path, smtputf8 ? "1" : "0"]
        stdin = Pipe()
        let stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        try process.run()

        // Read the "READY <port>" line; EOF first means the script failed to start.
        var output = Data()
        while !output.contains(UInt8(ascii: "\n")) {
            let chunk = stdout.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            output.append(chunk)
        }
        let line = String(decoding: output, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard line.hasPrefix("READY "), let port = Int(line.dropFirst(6)) else {
            process.terminate()
            throw SinkError(message: "aiosmtpd sink did not start: \(line.debugDescription)")
        }
        self.port = port
    }

    /// Stops the server (closing stdin lets it shut down cleanly; terminate is the fallback).
    func stop() {
        try? stdin.fileHandleForWriting.close()
        let deadline = Date().addingTimeInterval(5)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        try? FileManager.default.removeItem(at: directory)
    }

    /// Envelope and connection facts recorded for the n-th accepted message (1-based).
    struct Envelope: Decodable {
        var clientPort: Int
        var mailFrom: String
        var rcptTos: [String]
        var mailOptions: [String]
    }

    func envelope(_ n: Int) throws -> Envelope {
        try JSONDecoder().decode(Envelope.self, from: Data(contentsOf: file(n, "json")))
    }

    func rawMessage(_ n: Int) throws -> [UInt8] {
        try Array(Data(contentsOf: file(n, "eml")))
    }

    func storedMessageCount() throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasSuffix(".eml") }.count
    }

    func file(_ n: Int, _ ext: String) -> URL {
        directory.appendingPathComponent(String(format: "%03d.%@", n, ext))
    }

    /// A TCP port on 127.0.0.1 with nothing listening (bound, then released).
    static func unusedPort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw SinkError(message: "socket() failed") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard ok else { throw SinkError(message: "bind() failed") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

struct SinkError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// Parses a stored message with Python's `email` package (policy.default), as an
/// independent MIME parser, and returns what a mail client would see.
struct ParsedMessage: Decodable {
    struct Part: Decodable {
        var contentType: String
        var charset: String?
        var transferEncoding: String?
        var content: String
    }

    var headers: [String: String]
    var contentType: String
    var parts: [Part]
    var defects: [String]

    private static let script = #"""
        import email, email.policy, json, sys
        with open(sys.argv[1], "rb") as f:
            msg = email.message_from_binary_file(f, policy=email.policy.default)
        leaves = list(msg.walk()) if msg.is_multipart() else [msg]
        leaves = [p for p in leaves if not p.is_multipart()]
        defects = [repr(d) for p in msg.walk() for d in p.defects]
        print(json.dumps({
            "headers": {k: str(v) for k, v in msg.items()},
            "contentType": msg.get_content_type(),
            "parts": [{"contentType": p.get_content_type(), "charset": p.get_content_charset(),
                       "transferEncoding": p.get("Content-Transfer-Encoding"),
                       "content": p.get_content()} for p in leaves],
            "defects": defects,
        }))
        """#

    static func parse(_ file: URL) throws -> ParsedMessage {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script, file.path]
        let stdout = Pipe()
        process.standardOutput = stdout
        try process.run()
        let data = stdout.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw SinkError(message: "python email parser failed") }
        return try JSONDecoder().decode(ParsedMessage.self, from: data)
    }
}
