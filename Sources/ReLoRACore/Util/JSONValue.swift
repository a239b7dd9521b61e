import Foundation

/// A decoded JSON value with exact types (JSONDecoder does not turn `true` into 1 or `1` into true),
/// so configs and recipes can report a wrong type precisely.
public enum JSONValue: Decodable, Sendable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let d = try? c.decode(Double.self) { self = .number(d) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    /// Short rendering for error messages.
    public var summary: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return "\(b)"
        case .number(let d): return d == d.rounded() && abs(d) < 1e15 ? "\(Int(d))" : "\(d)"
        case .string(let s): return "\"\(s)\""
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}

/// Typed, error-reporting access to the keys of a JSON object. Errors are `.invalidConfig`.
public struct JSONKeys: Sendable {
    public let values: [String: JSONValue]

    public init(_ values: [String: JSONValue]) { self.values = values }

    public init(data: Data, what: String) throws {
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch {
            throw ReLoRAError.invalidConfig("\(what) is not valid JSON")
        }
        guard case .object(let dict) = value else {
            throw ReLoRAError.invalidConfig("\(what) must be a JSON object")
        }
        self.values = dict
    }

    /// Present and not null.
    public func has(_ key: String) -> Bool {
        if let v = values[key], v != .null { return true }
        return false
    }

    public func int(_ key: String) throws -> Int {
        guard let v = try optionalInt(key) else { throw ReLoRAError.invalidConfig("missing required key '\(key)'") }
        return v
    }

    public func optionalInt(_ key: String) throws -> Int? {
        guard let raw = values[key], raw != .null else { return nil }
        guard case .number(let d) = raw, d == d.rounded(), abs(d) < 1e15 else {
            throw ReLoRAError.invalidConfig("'\(key)' must be an integer, got \(raw.summary)")
        }
        return Int(d)
    }

    public func optionalDouble(_ key: String) throws -> Double? {
        guard let raw = values[key], raw != .null else { return nil }
        guard case .number(let d) = raw else {
            throw ReLoRAError.invalidConfig("'\(key)' must be a number, got \(raw.summary)")
        }
        return d
    }

    public func optionalBool(_ key: String) throws -> Bool? {
        guard let raw = values[key], raw != .null else { return nil }
        guard case .bool(let b) = raw else {
            throw ReLoRAError.invalidConfig("'\(key)' must be true or false, got \(raw.summary)")
        }
        return b
    }

    public func optionalString(_ key: String) throws -> String? {
        guard let raw = values[key], raw != .null else { return nil }
        guard case .string(let s) = raw else {
            throw ReLoRAError.invalidConfig("'\(key)' must be a string, got \(raw.summary)")
        }
        return s
    }
}
