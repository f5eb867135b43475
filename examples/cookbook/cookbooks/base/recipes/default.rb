# A minimal cookbook for amidala's chef provisioner:
#   amidala build --provisioner chef --opt run_list='recipe[base]' --opt attributes=attributes.json
user 'deploy' do
  uid 1500
  shell '/bin/sh'
  manage_home true
end

template '/etc/motd' do
  source 'motd.erb'
  mode '0644'
  variables(greeting: node['base']['greeting'], build: ENV['AMIDALA_BUILD_ID'])
end
