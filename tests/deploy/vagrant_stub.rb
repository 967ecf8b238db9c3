# Evaluates a Vagrantfile against a stand-in for Vagrant's configuration API and prints what
# it configures as JSON (machines, networks, providers, provisioners in order): what
# `vagrant up` would do, checked without Vagrant or VMs. Usage: ruby vagrant_stub.rb FILE
require "json"

# Provider blocks (`vb.cpus = 2`): records every assignment.
class ProviderSettings
  def initialize
    @values = {}
  end

  def method_missing(name, *args)
    return super unless name.to_s.end_with?("=")

    @values[name.to_s.chomp("=")] = args.first
  end

  def respond_to_missing?(name, include_private = false)
    name.to_s.end_with?("=") || super
  end

  def to_h
    @values
  end
end

# `config.vm`: only the calls the iptsync Vagrantfile makes; anything else fails loudly.
class VmSettings
  attr_accessor :box, :hostname

  def initialize
    @networks = []
    @synced_folders = []
    @providers = {}
    @provisioners = []
    @machines = {}
  end

  def network(type, **options)
    @networks << options.merge(type: type)
  end

  def synced_folder(source, destination, **options)
    @synced_folders << options.merge(source: source, destination: destination)
  end

  def provider(name)
    settings = ProviderSettings.new
    yield settings
    @providers[name] = settings.to_h
  end

  def provision(type, **options)
    @provisioners << options.merge(type: type)
  end

  def define(name, **options)
    machine = Config.new
    yield machine
    @machines[name] = { options: options, config: machine.to_h }
  end

  def to_h
    { box: @box, hostname: @hostname, networks: @networks, synced_folders: @synced_folders,
      providers: @providers, provisioners: @provisioners, machines: @machines }
  end
end

class Config
  attr_reader :vm

  def initialize
    @vm = VmSettings.new
  end

  def to_h
    { vm: @vm.to_h }
  end
end

module Vagrant
  @configs = []

  class << self
    attr_reader :configs

    def configure(version)
      raise ArgumentError, "configuration version #{version}, expected 2" unless version == "2"

      config = Config.new
      yield config
      @configs << config.to_h
    end
  end
end

load ARGV.fetch(0)
puts JSON.generate(Vagrant.configs)
